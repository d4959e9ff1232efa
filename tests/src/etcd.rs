//! An etcd of the test's own (Debian's `etcd-server`, which `cargo xtask test` installs), on
//! loopback ports, with its data in the test's directory: it can be stopped and started
//! again on the same data, as a network partition and its end look to the daemons.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{free_port, wait_for};

/// A running (or stopped) single-member etcd; killed when dropped.
#[derive(Debug)]
pub struct TestEtcd {
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl TestEtcd {
    /// Starts one under `dir` (made here) and waits until it answers.
    pub fn start(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).expect("the etcd directory");
        let mut e = Self {
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        e.launch();
        e
    }

    /// Its client URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts it again on its data, and waits until it answers.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "etcd is running already");
        let bin = "/usr/bin/etcd";
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: `cargo xtask test` installs Debian's etcd-server"
        );
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::File::create(self.dir.join("etcd.log")).expect("the etcd log");
        let child = Command::new(bin)
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        wait_for(Duration::from_secs(20), "etcd to answer", || {
            self.ctl(&["endpoint", "health"])
                .status
                .success()
                .then_some(())
        });
    }

    /// Kills it (a partition, as the daemons see it: their connections end).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcdctl` against it.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url()))
            .arg("--dial-timeout=1s")
            .arg("--command-timeout=2s")
            .args(args)
            .output()
            .expect("run etcdctl (Debian's etcd-client)")
    }

    /// Puts `value` at `key`, as any writer to etcd could.
    pub fn put(&self, key: &str, value: &str) {
        let o = self.ctl(&["put", key, value]);
        assert!(o.status.success(), "etcdctl put {key}: {o:?}");
    }

    /// Puts a value too long for a command line (etcdctl reads it from its stdin).
    pub fn put_large(&self, key: &str, value: &[u8]) {
        use std::io::Write as _;
        let mut child = Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url()))
            .arg("--command-timeout=10s")
            .args(["put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        child
            .stdin
            .take()
            .expect("etcdctl's stdin")
            .write_all(value)
            .expect("write the value");
        let o = child.wait_with_output().expect("etcdctl");
        assert!(o.status.success(), "etcdctl put {key}: {o:?}");
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let o = self.ctl(&["get", "--prefix", "--keys-only", prefix]);
        assert!(o.status.success(), "etcdctl get {prefix}: {o:?}");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
