//! A throw-away MariaDB server, the MariaDB counterpart of [`TempPostgres`](super::TempPostgres).
//!
//! When `MARIADB_URL` is set, [`mariadb_url`] returns it; otherwise it starts one private
//! server per process from the system's MariaDB binaries (`mariadbd` and
//! `mariadb-install-db`, 10.6 or later), on a free port of 127.0.0.1 and in a temporary
//! directory, and removes both when the process exits (even when it is killed).
//!
//! ```no_run
//! use mysql::prelude::Queryable;
//!
//! let url = troutbox::testing::mariadb_url().expect("a MariaDB server");
//! let mut conn = mysql::Conn::new(url.as_str()).unwrap();
//! let version: Option<String> = conn.query_first("SELECT VERSION()").unwrap();
//! println!("{version:?}");
//! ```

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{
    free_port, private_dir, random_password, write_private, Failure, PrivateDir, Watchdog,
};

/// How to get the binaries when none are found.
const INSTALL_HINT: &str = "no MariaDB server binaries found (looked for mariadbd and mariadb-install-db on PATH, in /usr/sbin and in /usr/bin): install them (Debian/Ubuntu: apt-get install mariadb-server) or set MARIADB_URL to a server you own";

/// The database [`TempMariaDb::url`] names, created at the first start.
const DATABASE: &str = "troutbox";

/// Why a throw-away MariaDB server could not be started or stopped: what failed, and the
/// I/O error behind it when there is one (as [`source`](std::error::Error::source), not
/// repeated in the message).
// No PartialEq: an error is inspected, not compared; its io::Error source has none.
#[derive(Debug)]
pub struct TempMariaDbError {
    message: String,
    source: Option<std::io::Error>,
}

impl fmt::Display for TempMariaDbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TempMariaDbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Failure> for TempMariaDbError {
    fn from(f: Failure) -> Self {
        TempMariaDbError {
            message: f.message,
            source: f.source,
        }
    }
}

fn fail<T>(message: impl Into<String>) -> Result<T, TempMariaDbError> {
    Err(TempMariaDbError {
        message: message.into(),
        source: None,
    })
}

fn fail_io<T>(message: impl Into<String>, source: std::io::Error) -> Result<T, TempMariaDbError> {
    Err(TempMariaDbError {
        message: message.into(),
        source: Some(source),
    })
}

/// `MARIADB_URL` if set and not empty; otherwise the URL of a throw-away server started on
/// first use and shared by the whole process (a `mysql://` URL for the `mysql` crate, see
/// [`TempMariaDb::url`]).
///
/// ```no_run
/// use mysql::prelude::Queryable;
///
/// let url = troutbox::testing::mariadb_url().expect("a MariaDB server");
/// let mut conn = mysql::Conn::new(url.as_str()).unwrap();
/// conn.query_drop("CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY)").unwrap();
/// ```
pub fn mariadb_url() -> Result<String, TempMariaDbError> {
    if let Ok(url) = std::env::var("MARIADB_URL") {
        if !url.is_empty() {
            return Ok(url);
        }
    }
    static SHARED: OnceLock<Result<TempMariaDb, String>> = OnceLock::new();
    // An error cannot be cloned for every caller: each gets its text, cause included.
    let shared = SHARED.get_or_init(|| {
        TempMariaDb::start().map_err(|e| match &e.source {
            Some(cause) => format!("{}: {cause}", e.message),
            None => e.message,
        })
    });
    match shared {
        Ok(server) => Ok(server.url()),
        Err(e) => fail(e.clone()),
    }
}

/// Options for a [`TempMariaDb`].
// No PartialEq: its settings are a set kept in the order they were given, so a derived
// equality would tell two builders with the same settings apart.
#[derive(Debug, Clone)]
pub struct TempMariaDbBuilder {
    settings: Vec<(String, String)>,
}

impl Default for TempMariaDbBuilder {
    /// `innodb-buffer-pool-size=64M` (small: several servers may run at once),
    /// `max-connections=200`, and `character-set-server=utf8mb4` with
    /// `collation-server=utf8mb4_general_ci` (what Debian's configuration file sets, which
    /// the server does not read; the server's own default is latin1). Durability is
    /// MariaDB's default: the InnoDB log is flushed at each commit.
    fn default() -> Self {
        TempMariaDbBuilder {
            settings: vec![
                ("innodb-buffer-pool-size".into(), "64M".into()),
                ("max-connections".into(), "200".into()),
                ("character-set-server".into(), "utf8mb4".into()),
                ("collation-server".into(), "utf8mb4_general_ci".into()),
            ],
        }
    }
}

impl TempMariaDbBuilder {
    /// Sets a server option (`mariadbd --name=value`), replacing an earlier value of the
    /// same name as written (`max-connections` and `max_connections` are two names here);
    /// `setting("innodb-flush-log-at-trx-commit", "2")`, say, for a benchmark that does not
    /// need durable commits.
    #[must_use]
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Initialises and starts the server, creates the database `troutbox`, and waits until
    /// the server accepts connections.
    pub fn start(self) -> Result<TempMariaDb, TempMariaDbError> {
        TempMariaDb::start_with(self)
    }
}

/// A MariaDB server in a temporary directory, stopped and removed on drop, or when the
/// process exits.
///
/// As safe on a shared machine as the PostgreSQL one: `root` is the only account that can
/// log in, and only with its random password (set by an init file the server runs before it
/// takes its first connection, so there is no moment without it); the data, the log and the
/// socket live in a private directory (mode 0700, a random name created atomically); the
/// server runs with a cleared environment and, when this process runs as root, as the
/// `mysql` system account (or `nobody`). It keeps MariaDB's durability defaults (InnoDB
/// flushes its log at each commit) so that a crash test ([`kill_server`](Self::kill_server))
/// loses nothing a commit acknowledged.
///
/// Cleanup is done by a small watchdog shell process that waits for its standard input to
/// close: that happens on drop, and also when this process dies in any way, so no server or
/// directory is left behind.
// No PartialEq: a running server (a process and a directory), not a value.
pub struct TempMariaDb {
    dir: PathBuf,
    port: u16,
    /// root's password: random, set before the first connection, required on every one.
    password: String,
    mariadbd: PathBuf,
    run_as: Option<(u32, u32)>,
    settings: Vec<(String, String)>,
    server: Option<Child>,
    /// Always there until drop (an Option to be taken there).
    watchdog: Option<Watchdog>,
}

impl fmt::Debug for TempMariaDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempMariaDb")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TempMariaDb {
    /// Starts a server with the default settings.
    pub fn start() -> Result<TempMariaDb, TempMariaDbError> {
        Self::builder().start()
    }

    /// Options for a server.
    pub fn builder() -> TempMariaDbBuilder {
        TempMariaDbBuilder::default()
    }

    fn start_with(options: TempMariaDbBuilder) -> Result<TempMariaDb, TempMariaDbError> {
        let Some((mariadbd, install_db)) = find_binaries() else {
            return fail(INSTALL_HINT);
        };
        let PrivateDir {
            dir,
            run_as,
            watchdog,
        } = private_dir("troutbox-mariadb-", "mysql", "TERM")?;
        let mut server = TempMariaDb {
            dir,
            port: 0,
            password: random_password()?,
            mariadbd,
            run_as,
            settings: options.settings,
            server: None,
            watchdog: Some(watchdog),
        };
        server.install_db(&install_db)?;
        // Run once by the first start, before the server takes a connection: root gets its
        // password on every host install-db created it for (localhost, 127.0.0.1, ::1),
        // the accounts of this machine's name go (never reachable here: names are not
        // resolved), and the database is created. Removed once the server is up.
        let init = format!(
            "DELETE FROM mysql.global_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');\n\
             DELETE FROM mysql.proxies_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');\n\
             FLUSH PRIVILEGES;\n\
             ALTER USER root@'localhost' IDENTIFIED BY '{pw}';\n\
             ALTER USER root@'127.0.0.1' IDENTIFIED BY '{pw}';\n\
             ALTER USER root@'::1' IDENTIFIED BY '{pw}';\n\
             CREATE DATABASE {DATABASE};\n",
            pw = server.password
        );
        write_private(&server.dir.join("init.sql"), init.as_bytes(), run_as)?;
        server.start_server()?;
        Ok(server)
    }

    /// A URL for `root` on the database `troutbox`, with root's password (the server
    /// accepts no connection without it): `mysql://root:<password>@127.0.0.1:<port>/troutbox`,
    /// as [`mysql::Opts::from_url`] reads it.
    pub fn url(&self) -> String {
        format!(
            "mysql://root:{}@127.0.0.1:{}/{DATABASE}",
            self.password, self.port
        )
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server with a clean shutdown (SIGTERM: open sessions are ended, InnoDB
    /// shuts down normally), keeping its data. For tests that need the database to go away
    /// and come back.
    pub fn stop_server(&mut self) -> Result<(), TempMariaDbError> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .or_else(|e| fail_io("cannot run kill", e))?;
        if !status.success() {
            return fail("kill -TERM on the server failed");
        }
        child
            .wait()
            .or_else(|e| fail_io("waiting for the server", e))?;
        self.unwatch();
        Ok(())
    }

    /// Kills the server with SIGKILL, as a crash would, keeping its data: the next
    /// [`start_server`](Self::start_server) recovers it (InnoDB crash recovery). For tests
    /// of what survives a crash.
    pub fn kill_server(&mut self) -> Result<(), TempMariaDbError> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        child
            .kill()
            .or_else(|e| fail_io("cannot kill the server", e))?;
        child
            .wait()
            .or_else(|e| fail_io("waiting for the server", e))?;
        self.unwatch();
        Ok(())
    }

    /// Starts the server again after [`stop_server`](Self::stop_server) or
    /// [`kill_server`](Self::kill_server), on the same port.
    pub fn start_server(&mut self) -> Result<(), TempMariaDbError> {
        if self.server.is_some() {
            return Ok(());
        }
        let fixed_port = self.port != 0;
        for _ in 0..5 {
            if !fixed_port {
                self.port = free_port()?;
            }
            match self.spawn_server() {
                Ok(()) => return Ok(()),
                Err(e) if !fixed_port && e.message.contains("Address already in use") => continue,
                Err(e) => return Err(e),
            }
        }
        fail("could not find a free port for MariaDB")
    }

    fn unwatch(&mut self) {
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.unwatch();
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        // A clean environment: the server must not inherit the caller's secrets (a CI
        // job's tokens, a cloud key). install-db is a shell script that runs mariadbd
        // and a few tools: the PATH holds the usual places, the binaries' one first.
        let mut path = String::new();
        if let Some(parent) = program.parent().and_then(Path::to_str) {
            path = format!("{parent}:");
        }
        path.push_str("/usr/sbin:/usr/bin:/sbin:/bin");
        cmd.current_dir(&self.dir)
            .env_clear()
            .env("PATH", path)
            .env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn install_db(&self, install_db: &Path) -> Result<(), TempMariaDbError> {
        // The server's temporary files (internal temporary tables) go to a directory of its
        // own in the private one, not to the shared /tmp.
        let tmp = self.dir.join("tmp");
        fs::create_dir(&tmp).or_else(|e| fail_io(format!("cannot create {}", tmp.display()), e))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .or_else(|e| fail_io(format!("cannot hand {} to uid {uid}", tmp.display()), e))?;
        }
        let mut cmd = self.command(install_db);
        // --no-defaults first (the script requires it there): no /etc/mysql/*.cnf, no
        // ~/.my.cnf. The server binary is the one found, whatever the script would pick.
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ]);
        if let Some(basedir) = self.mariadbd.parent().and_then(Path::parent) {
            cmd.arg(format!("--basedir={}", basedir.display()));
        }
        let output = cmd
            .output()
            .or_else(|e| fail(format!("cannot run {}: {e}", install_db.display())))?;
        if !output.status.success() {
            return fail(format!(
                "mariadb-install-db failed ({}): {} {}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(())
    }

    fn spawn_server(&mut self) -> Result<(), TempMariaDbError> {
        let log_path = self.dir.join("server.log");
        let log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .or_else(|e| fail_io(format!("cannot create {}", log_path.display()), e))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::fchown(&log, Some(uid), Some(gid)).or_else(|e| {
                fail_io(
                    format!("cannot hand {} to uid {uid}", log_path.display()),
                    e,
                )
            })?;
        }
        // Only this start's part of the log goes into an error message.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .or_else(|e| fail_io("cannot duplicate the log file handle", e))?;
        // A server killed with SIGKILL leaves its socket and the socket's lock file (with
        // its pid, which another process may have by now): both are ours, no server runs.
        let socket = self.dir.join("mysqld.sock");
        let _ = fs::remove_file(&socket);
        let _ = fs::remove_file(self.dir.join("mysqld.sock.lock"));
        let init = self.dir.join("init.sql");
        let mut cmd = self.command(&self.mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--tmpdir={}", self.dir.join("tmp").display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mariadbd.pid").display()
            ))
            .arg(format!("--log-error={}", log_path.display()))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"]);
        if init.exists() {
            cmd.arg(format!("--init-file={}", init.display()));
        }
        for (name, value) in &self.settings {
            cmd.arg(format!("--{name}={value}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .or_else(|e| fail_io(format!("cannot start {}", self.mariadbd.display()), e))?;
        if let Some(watchdog) = &mut self.watchdog {
            if let Err(e) = watchdog.watch(child.id()) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        }
        let this_log = || {
            let mut text = String::new();
            if let Ok(mut file) = fs::File::open(&log_path) {
                let _ = file.seek(SeekFrom::Start(log_start));
                let _ = file.read_to_string(&mut text);
            }
            text
        };
        // Timeouts on each attempt: whatever else holds the port (a server started before
        // ours could bind, on a fixed port) may accept the connection and never answer.
        let poll_options = mysql::OptsBuilder::from_opts(
            mysql::Opts::from_url(&self.url()).expect("a URL of ours parses"),
        )
        .tcp_connect_timeout(Some(Duration::from_secs(1)))
        .read_timeout(Some(Duration::from_secs(2)))
        .write_timeout(Some(Duration::from_secs(2)));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.unwatch();
                return fail(format!(
                    "mariadbd exited with {status}: {}",
                    this_log().trim()
                ));
            }
            if mysql::Conn::new(poll_options.clone()).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.unwatch();
                return fail(format!(
                    "mariadbd did not accept connections within 60 s: {}",
                    this_log().trim()
                ));
            }
            // Polling a starting server: there is no event to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_file(&init);
        self.server = Some(child);
        Ok(())
    }
}

impl Drop for TempMariaDb {
    fn drop(&mut self) {
        // The watchdog stops the server and removes the directory.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.finish(self.server.take());
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `mariadbd` and `mariadb-install-db`: on `PATH` first, then in /usr/sbin and /usr/bin
/// (Debian keeps the server in /usr/sbin, often not on an ordinary user's PATH).
fn find_binaries() -> Option<(PathBuf, PathBuf)> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/bin".into());
    let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    Some((find("mariadbd")?, find("mariadb-install-db")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql::prelude::Queryable;

    #[test]
    fn starts_restarts_keeps_data_and_cleans_up() {
        // A secret in this process's environment must not reach the server's.
        std::env::set_var("TROUTBOX_MARIADB_SECRET_PROBE", "do-not-leak");
        let started = Instant::now();
        let mut server = TempMariaDb::start().expect("a throw-away MariaDB server");
        eprintln!("started in {:?}", started.elapsed());
        let dir = server.dir.clone();
        assert!(server.data_dir().is_dir());
        assert_eq!(
            fs::metadata(&dir)
                .map(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.permissions().mode() & 0o777
                })
                .unwrap(),
            0o700
        );
        assert!(
            !dir.join("init.sql").exists(),
            "the init file holds the password"
        );
        let log_mode = fs::metadata(dir.join("server.log")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&log_mode.permissions()) & 0o077,
            0,
            "the log is private"
        );
        let pid = server.server.as_ref().unwrap().id();
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(environ.contains("PATH="), "{environ}");
        assert!(!environ.contains("do-not-leak"), "{environ}");

        let url = server.url();
        assert!(url.ends_with(&format!("@127.0.0.1:{}/troutbox", server.port())));
        let mut conn = mysql::Conn::new(url.as_str()).expect("connect");
        let version: String = conn.query_first("SELECT VERSION()").unwrap().unwrap();
        let numbers: Vec<u32> = version
            .split(|c: char| !c.is_ascii_digit())
            .take(2)
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(
            numbers[0] > 10 || (numbers[0] == 10 && numbers[1] >= 6),
            "{version}"
        );
        let database: Option<String> = conn.query_first("SELECT DATABASE()").unwrap();
        assert_eq!(database.as_deref(), Some("troutbox"));

        // root is the only account that can log in (mariadb.sys is locked), on 127.0.0.1,
        // ::1 and the socket only, all with the password.
        let accounts: Vec<(String, String, Option<String>, Option<String>)> = conn
            .query(
                "SELECT User, Host, JSON_VALUE(Priv, '$.account_locked'), \
                 JSON_VALUE(Priv, '$.authentication_string') FROM mysql.global_priv",
            )
            .unwrap();
        for (user, host, locked, auth) in &accounts {
            if user == "root" {
                assert!(
                    ["localhost", "127.0.0.1", "::1"].contains(&host.as_str()),
                    "{host}"
                );
                assert!(auth.as_deref().is_some_and(|a| !a.is_empty()), "{host}");
            } else {
                // JSON true, as MariaDB 10.11 returns it: "1".
                assert!(
                    matches!(locked.as_deref(), Some("1" | "true")),
                    "{user}@{host} is not locked: {locked:?}"
                );
            }
        }

        // Without the password, or with another one, no connection.
        let port = server.port();
        assert!(
            mysql::Conn::new(format!("mysql://root@127.0.0.1:{port}/troutbox").as_str()).is_err()
        );
        assert!(mysql::Conn::new(
            format!("mysql://root:x@127.0.0.1:{port}/troutbox?prefer_socket=false").as_str()
        )
        .is_err());

        conn.query_drop("CREATE TABLE kept (id INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB")
            .unwrap();
        conn.query_drop("INSERT INTO kept VALUES (1, 'before stop')")
            .unwrap();
        drop(conn);

        let stopping = Instant::now();
        server.stop_server().unwrap();
        eprintln!("stopped in {:?}", stopping.elapsed());
        assert!(mysql::Conn::new(url.as_str()).is_err());
        assert!(dir.is_dir(), "stop_server keeps the data");
        let log = fs::read_to_string(dir.join("server.log")).unwrap();
        assert!(
            log.trim_end().ends_with("Shutdown complete"),
            "a clean shutdown: {log}"
        );
        let restarting = Instant::now();
        server.start_server().unwrap();
        eprintln!("restarted in {:?}", restarting.elapsed());
        assert_eq!(server.port(), port);
        let mut conn = mysql::Conn::new(url.as_str()).unwrap();
        let v: Option<String> = conn.query_first("SELECT v FROM kept WHERE id = 1").unwrap();
        assert_eq!(v.as_deref(), Some("before stop"));

        // A crash: what a commit acknowledged survives.
        conn.query_drop("INSERT INTO kept VALUES (2, 'before kill')")
            .unwrap();
        drop(conn);
        server.kill_server().unwrap();
        let recovering = Instant::now();
        server.start_server().unwrap();
        eprintln!("recovered in {:?}", recovering.elapsed());
        let mut conn = mysql::Conn::new(url.as_str()).unwrap();
        let n: Option<u64> = conn.query_first("SELECT COUNT(*) FROM kept").unwrap();
        assert_eq!(n, Some(2));
        drop(conn);

        let dropping = Instant::now();
        drop(server);
        eprintln!("dropped in {:?}", dropping.elapsed());
        assert!(!dir.exists(), "drop removes {}", dir.display());
        assert!(mysql::Conn::new(url.as_str()).is_err());
    }

    #[test]
    fn a_taken_port_is_reported_with_the_log() {
        let mut server = TempMariaDb::start().unwrap();
        let port = server.port();
        server.stop_server().unwrap();
        // The same port (a restart keeps it), taken meanwhile by someone else.
        let _squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let err = server.start_server().unwrap_err();
        let text = err.to_string();
        // start_server retries a first start on another port on this text.
        assert!(text.contains("Address already in use"), "{text}");
        assert!(
            !text.contains("ready for connections"),
            "this start's log only: {text}"
        );
        assert!(server.data_dir().is_dir(), "a failed start keeps the data");
        drop(_squatter);
        server.start_server().unwrap();
        assert_eq!(server.port(), port);
    }

    #[test]
    fn settings_reach_the_server() {
        let server = TempMariaDb::builder()
            .setting("max-connections", "77")
            .start()
            .unwrap();
        let mut conn = mysql::Conn::new(server.url().as_str()).unwrap();
        let n: Option<u64> = conn.query_first("SELECT @@max_connections").unwrap();
        assert_eq!(n, Some(77));
        let durable: Option<u64> = conn
            .query_first("SELECT @@innodb_flush_log_at_trx_commit")
            .unwrap();
        assert_eq!(durable, Some(1));
    }

    #[test]
    fn mariadb_url_is_shared() {
        if std::env::var_os("MARIADB_URL").is_some() {
            return;
        }
        let a = mariadb_url().unwrap();
        let b = mariadb_url().unwrap();
        assert_eq!(a, b);
        mysql::Conn::new(a.as_str()).unwrap();
    }
}
