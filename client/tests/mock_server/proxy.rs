//! A TCP proxy in front of a server that a test can freeze (it stops forwarding, in both
//! directions, and keeps the connections open: a peer that went silent) or cut (it closes
//! them: a server that went away).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with the bytes of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forwards them.
    Open,
    /// Holds the connections open and forwards nothing more.
    Frozen,
    /// Closes the connections.
    Cut,
}

/// A running proxy; dropping it leaves the connections as they are.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
}

impl Proxy {
    /// Proxies a free local port to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link, state) = watch::channel(Link::Open);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, state.clone()));
                tokio::spawn(pump(server_read, client_write, state.clone()));
            }
        });
        Ok(Self { addr, link })
    }

    /// Switches every connection, present and future, to `link`.
    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

/// Copies `from` to `to` while the link is open.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buf = vec![0; 16 << 10];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let now = *link.borrow();
                match now {
                    Link::Open => {}
                    Link::Frozen => std::future::pending::<()>().await,
                    Link::Cut => return,
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = link.changed() => {
                if changed.is_err() || *link.borrow() == Link::Cut {
                    return;
                }
            }
        }
    }
}
