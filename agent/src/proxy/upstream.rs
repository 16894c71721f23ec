//! Connections from the agent to the real gateway.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `dst` from a socket carrying `mark` as its SO_MARK (0: none). The kernel hook
/// never redirects a socket with the agent's mark, so even a connection the tgid guard would
/// miss cannot loop back into the proxy.
pub async fn connect(dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if mark != 0 {
        sock.set_mark(mark)?;
    }
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    sock.connect(dst).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_the_mark() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, accepted) = tokio::join!(connect(addr, 0x6d63_7472), listener.accept());
        let stream = stream.unwrap();
        accepted.unwrap();
        let mark = socket2::SockRef::from(&stream).mark().unwrap();
        assert_eq!(mark, 0x6d63_7472);
    }
}
