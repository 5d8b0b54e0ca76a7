//! Listening sockets handed over by systemd (socket activation: `LISTEN_FDS`
//! and `LISTEN_PID`, fds from 3). systemd keeps such a socket open across a
//! restart of the service, so connections that arrive while the old process
//! drains and the new one starts wait in the kernel's backlog instead of
//! being refused.

use std::io;
use std::os::unix::net::UnixListener;

/// The sockets this process was started with, taken once at start.
#[derive(Debug, Default)]
pub struct Inherited {
    pub tcp: Vec<std::net::TcpListener>,
    pub unix: Vec<UnixListener>,
}

impl Inherited {
    /// Take the sockets the environment announces, and remove the
    /// variables so that no child sees them. Call before any thread starts.
    pub fn from_env() -> io::Result<Inherited> {
        let mut fds = listenfd::ListenFd::from_env();
        let mut inherited = Inherited::default();
        for index in 0..fds.len() {
            if let Ok(Some(listener)) = fds.take_tcp_listener(index) {
                inherited.tcp.push(listener);
                continue;
            }
            match fds.take_unix_listener(index) {
                Ok(Some(listener)) => inherited.unix.push(listener),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "LISTEN_FDS: fd {} is neither a listening TCP nor a Unix stream socket",
                            index + 3
                        ),
                    ));
                }
            }
        }
        Ok(inherited)
    }
}
