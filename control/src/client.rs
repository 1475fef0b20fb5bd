//! The control client: connect, send one request line, collect progress events and the reply.

use crate::protocol::{Event, EventLine, Reply, Request};
use std::io;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Why a call failed (the proxy's refusals are not errors here: they are replies).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach the control socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The connection broke.
    #[error("control connection failed: {0}")]
    Io(#[from] io::Error),
    /// The proxy sent something that is not the protocol.
    #[error("unexpected answer from the proxy: {0}")]
    Protocol(String),
}

/// A connection to a proxy's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connect to `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ControlClient {
            stream: BufReader::new(stream),
        })
    }

    /// Send `req`; `on_event` sees each progress event; returns the final reply.
    pub async fn call(
        &mut self,
        req: &Request,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line).await?;
        loop {
            let mut buf = String::new();
            if self.stream.read_line(&mut buf).await? == 0 {
                return Err(ClientError::Protocol(
                    "connection closed before the reply".into(),
                ));
            }
            let v: serde_json::Value = serde_json::from_str(&buf)
                .map_err(|e| ClientError::Protocol(format!("{e}: {}", buf.trim())))?;
            if v.get("event").is_some() {
                let ev: EventLine =
                    serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))?;
                on_event(&ev.event);
                continue;
            }
            return serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()));
        }
    }

    /// `call` without watching events.
    pub async fn request(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.call(req, |_| {}).await
    }
}
