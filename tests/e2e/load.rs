//! Many concurrent keep-alive clients (issue 2).

use switchyard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_keepalive_clients_fifty_requests_each_no_errors() {
    trace_init();
    let a = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let b = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let px = TestProxy::start(&app_yaml(&[("blue", &[a.addr(), b.addr()])], "blue", "")).await;
    let addr = px.addr;
    let clients: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Conn::open(addr).await?;
                let mut errors = Vec::new();
                for i in 0..50 {
                    match c.get(&format!("/item/{i}")).await {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => errors.push(format!("status {}", r.status)),
                        Err(e) => errors.push(e),
                    }
                }
                Ok::<_, String>(errors)
            })
        })
        .collect();
    let mut errors = Vec::new();
    for c in clients {
        match c.await.unwrap() {
            Ok(e) => errors.extend(e),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(a.hits() + b.hits(), 10_000);
    assert!(a.hits() > 0 && b.hits() > 0);
    // Plain GETs: every one went through switchyard's own forwarder (`proxy::fast`).
    assert_eq!(px.handle().fast_path_requests(), 10_000);
    px.shutdown().await;
}
