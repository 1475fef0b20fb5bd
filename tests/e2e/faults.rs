//! Upstream faults (issue 10): an app that resets mid-body, stalls after its headers, sends an
//! invalid status line, a Content-Length it does not honour, or 1 MiB of headers. The client
//! gets a clean 502/504 or a cut connection — never a hang past `read_timeout` — the in-flight
//! count returns to 0, and passive health counts the failure.

use std::time::{Duration, Instant};
use switchyard_tests::*;

/// GET `/x` on a new connection: the status, or the error, and how long it took.
async fn attempt(px: &TestProxy) -> (Result<u16, String>, Duration) {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = Conn::open(px.addr).await?;
        c.get("/x").await.map(|r| r.status)
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 10 s".into()));
    (r, start.elapsed())
}

fn passive_failures(px: &TestProxy) -> u32 {
    px.handle().status().upstream("app").unwrap().pools[0].instances[0].passive_failures
}

#[tokio::test]
async fn each_upstream_fault_ends_cleanly_and_counts() {
    trace_init();
    let up = RawUpstream::start().await;
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[up.addr])],
        "blue",
        "    read_timeout: 500ms\n    retries: 0\n    passive: {consecutive_failures: 100}\n",
    ))
    .await;
    let (ok, _) = attempt(&px).await;
    assert_eq!(ok, Ok(200));
    for (fault, want) in [
        (Fault::BadStatusLine, Some(502)),
        (Fault::HugeHeaders, Some(502)),
        (Fault::CloseAtOnce, Some(502)),
        (Fault::ResetMidBody, None),
        (Fault::ShortBody, None),
        (Fault::StallAfterHeaders, None),
    ] {
        up.set(fault);
        let before = passive_failures(&px);
        let (got, took) = attempt(&px).await;
        match want {
            Some(code) => assert_eq!(got, Ok(code), "{fault:?}"),
            // The response had begun: the client sees its connection cut (an error), not a
            // complete answer and not a hang.
            None => assert!(got.is_err(), "{fault:?}: {got:?}"),
        }
        assert!(took < Duration::from_secs(3), "{fault:?} took {took:?}");
        eventually(|| px.inflight("blue") == 0).await;
        assert!(passive_failures(&px) > before, "{fault:?} not counted");
        up.set(Fault::None);
        let (again, _) = attempt(&px).await;
        assert_eq!(again, Ok(200), "after {fault:?}");
    }
    px.shutdown().await;
}
