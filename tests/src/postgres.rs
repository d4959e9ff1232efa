//! A PostgreSQL server of the test's own (Debian's `postgresql`, which `cargo xtask test`
//! installs), on a loopback port, with its data in the test's directory, run as the
//! `postgres` user (the server refuses root). Stopped and removed when dropped.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{free_port, wait_for};

/// The superuser's name and password.
pub const ADMIN: &str = "postgres";
pub const ADMIN_PASSWORD: &str = "aw-test-admin-password";

/// A running PostgreSQL; stopped when dropped.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

/// The directory of the newest PostgreSQL's programs.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().filter(|b| b.join("initdb").exists()).expect(
        "no /usr/lib/postgresql/*/bin/initdb: `cargo xtask test` installs Debian's postgresql",
    )
}

/// `program args` as the `postgres` user.
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--clear-groups",
        "--",
    ])
    .arg(program);
    c
}

impl TestPostgres {
    /// A new cluster under `dir` (made here), started, answering on 127.0.0.1.
    pub fn start(dir: &Path) -> Self {
        let bin = bin_dir();
        let dir = dir.join("postgres");
        fs::create_dir_all(&dir).expect("the postgres directory");
        let pwfile = dir.join("pw");
        fs::write(&pwfile, ADMIN_PASSWORD).expect("password file");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let data = dir.join("data");
        let o = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", ADMIN, "--auth=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb");
        assert!(o.status.success(), "initdb: {o:?}");
        let log = fs::File::create(dir.join("server.log")).expect("log");
        let port = free_port();
        let child = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let pg = Self {
            dir,
            port,
            child: Some(child),
        };
        wait_for(Duration::from_secs(30), "postgres to answer", || {
            pg.admin("postgres", "SELECT 1")
                .status
                .success()
                .then_some(())
        });
        pg
    }

    /// `psql` on `database` as the superuser, running `sql`.
    pub fn admin(&self, database: &str, sql: &str) -> Output {
        self.psql(
            &format!(
                "postgresql://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{}/{database}",
                self.port
            ),
            sql,
        )
    }

    /// `psql URI -c SQL`, tuples only, stopping at the first error.
    pub fn psql(&self, uri: &str, sql: &str) -> Output {
        Command::new(bin_dir().join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                uri,
                "-c",
                sql,
            ])
            .env_remove("PGPASSWORD")
            .output()
            .expect("psql")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: the fast shutdown, sessions ended.
            // SAFETY: kill(2) on the server's pid, which this struct started and has not reaped.
            unsafe { libc::kill(i32::try_from(c.id()).unwrap_or(0), libc::SIGINT) };
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
