//! A client of the daemon's API (what the `wisp` CLI and the benchmark use;
//! `curl --unix-socket` is another).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no Wisp daemon is listening on {0} (start one with `wisp daemon`, or point --socket / WISP_SOCKET at it)")]
    NoDaemon(PathBuf),
    #[error("talking to the daemon on {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the daemon sent a malformed response")]
    Malformed,
}

pub struct Client {
    socket: PathBuf,
}

/// A response: status and body.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `error` field of an error reply, or the body.
    pub fn error_text(&self) -> String {
        self.json()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon(self.socket.clone())
            }
            _ => ClientError::Io(self.socket.clone(), e),
        })
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<UnixStream, ClientError> {
        let mut s = self.connect()?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: wisp\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| ClientError::Io(self.socket.clone(), e))?;
        Ok(s)
    }

    /// Sends a request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ClientError> {
        let mut s = self.send(method, path, body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| ClientError::Io(self.socket.clone(), e))?;
        let (status, head_len) = parse_head(&raw)?;
        Ok(Reply {
            status,
            body: raw[head_len..].to_vec(),
        })
    }

    /// Sends a GET and copies the body to `out` as it arrives (for a
    /// followed log); an error status is returned with its body instead.
    pub fn stream(&self, path: &str, out: &mut dyn Write) -> Result<Reply, ClientError> {
        let mut s = self.send("GET", path, None)?;
        let io = |e| ClientError::Io(self.socket.clone(), e);
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        let (status, head_len) = loop {
            let n = s.read(&mut chunk).map_err(io)?;
            if n == 0 {
                return Err(ClientError::Malformed);
            }
            raw.extend_from_slice(&chunk[..n]);
            match parse_head(&raw) {
                Ok(h) => break h,
                Err(_) if raw.len() < 16384 => continue,
                Err(e) => return Err(e),
            }
        };
        if status != 200 {
            let mut rest = raw[head_len..].to_vec();
            let _ = s.read_to_end(&mut rest);
            return Ok(Reply { status, body: rest });
        }
        out.write_all(&raw[head_len..]).map_err(io)?;
        let _ = out.flush();
        loop {
            let n = s.read(&mut chunk).map_err(io)?;
            if n == 0 {
                break;
            }
            if out
                .write_all(&chunk[..n])
                .and_then(|_| out.flush())
                .is_err()
            {
                break;
            }
        }
        Ok(Reply {
            status,
            body: Vec::new(),
        })
    }
}

fn parse_head(raw: &[u8]) -> Result<(u16, usize), ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => Ok((r.code.ok_or(ClientError::Malformed)?, n)),
        _ => Err(ClientError::Malformed),
    }
}
