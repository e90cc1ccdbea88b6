//! A private etcd for tests (Debian's `etcd-server`): loopback ports, a
//! temporary data dir, killed by PID on drop (also when a test panics).
//! It can be killed and started again on the same ports and data.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::{free_addr, wait_for, Proc};

pub struct Etcd {
    pub dir: TempDir,
    pub client: SocketAddr,
    peer: SocketAddr,
    pub proc: Proc,
    starts: usize,
}

impl Etcd {
    /// Starts etcd and waits until it accepts connections.
    pub fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("im-etcd-")
            .tempdir()
            .expect("tempdir");
        let (client, peer) = (free_addr(), free_addr());
        let proc = Self::spawn(&dir, client, peer, 1);
        let e = Etcd {
            dir,
            client,
            peer,
            proc,
            starts: 1,
        };
        e.wait_ready();
        e
    }

    fn spawn(dir: &TempDir, client: SocketAddr, peer: SocketAddr, n: usize) -> Proc {
        let client_url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args([
                "--max-txn-ops",
                "10000",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ]);
        Proc::spawn(cmd, dir.path().join(format!("etcd-{n}.log")))
            .expect("start etcd (apt-get install etcd-server)")
    }

    fn wait_ready(&self) {
        let addr = self.client;
        wait_for("etcd to listen", Duration::from_secs(15), || {
            std::net::TcpStream::connect(addr).is_ok().then_some(())
        });
    }

    /// `--store` value for controllers.
    pub fn store_spec(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// SIGKILL, then start again on the same ports and data.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.starts += 1;
        self.proc = Self::spawn(&self.dir, self.client, self.peer, self.starts);
        self.wait_ready();
    }
}
