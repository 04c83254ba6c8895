//! A throw-away PostgreSQL server for tests and examples.
//!
//! troutbox's own tests and examples use this module, and so can yours: when `DATABASE_URL`
//! is set, [`database_url`] returns it; otherwise it starts one private server per process
//! from the system's PostgreSQL binaries, on a free port and in a temporary directory, and
//! removes both when the process exits (even when it is killed).
//!
//! Behind the `testing` feature (Unix only): a normal build of the library contains none of
//! it. Safe on a shared machine: the server accepts connections only with its random
//! superuser password (SCRAM), its data, log and socket live in a private directory (mode
//! 0700, a random name created atomically), and it runs with a cleared environment, so a
//! CI job's secrets do not reach it.
//!
//! The binaries are looked up on `PATH` (`initdb`), then through `pg_config --bindir`, then
//! under `/usr/lib/postgresql/*/bin` (Debian and Ubuntu keep them there). `initdb` refuses to
//! run as root, so when the process runs as root the server runs as the `postgres` system
//! account (or `nobody`), switched to with [`std::os::unix::process::CommandExt::uid`].
//!
//! ```no_run
//! let url = troutbox::testing::database_url().expect("a PostgreSQL server");
//! let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
//! client.batch_execute("SELECT 1").unwrap();
//! ```
//!
//! With the `mariadb` feature too, `TempMariaDb` and `mariadb_url` do the same for
//! MariaDB (`MARIADB_URL`, else a private server from the system's `mariadbd`).

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{fchown, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[cfg(feature = "mariadb")]
mod mariadb;
#[cfg(feature = "mariadb")]
#[cfg_attr(docsrs, doc(cfg(feature = "mariadb")))]
pub use mariadb::{mariadb_url, TempMariaDb, TempMariaDbBuilder, TempMariaDbError};

/// How to get the binaries when none are found.
const INSTALL_HINT: &str = "no PostgreSQL server binaries found (looked for initdb on PATH, via pg_config --bindir and in /usr/lib/postgresql/*/bin): install them (Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL to a server you own";

/// Why a throw-away server could not be started: what failed, and the I/O error behind it
/// when there is one (as [`source`](std::error::Error::source), not repeated in the message).
// No PartialEq: an error is inspected, not compared; its io::Error source has none.
#[derive(Debug)]
pub struct TempPostgresError {
    message: String,
    source: Option<std::io::Error>,
}

impl fmt::Display for TempPostgresError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TempPostgresError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A failure in a step both servers share (a directory, a port, the watchdog), turned into
/// the public error of the server being started by `?`.
#[derive(Debug)]
struct Failure {
    message: String,
    source: Option<std::io::Error>,
}

impl From<Failure> for TempPostgresError {
    fn from(f: Failure) -> Self {
        TempPostgresError {
            message: f.message,
            source: f.source,
        }
    }
}

fn failure<T>(message: impl Into<String>, source: std::io::Error) -> Result<T, Failure> {
    Err(Failure {
        message: message.into(),
        source: Some(source),
    })
}

fn fail<T>(message: impl Into<String>) -> Result<T, TempPostgresError> {
    Err(TempPostgresError {
        message: message.into(),
        source: None,
    })
}

fn fail_io<T>(message: impl Into<String>, source: std::io::Error) -> Result<T, TempPostgresError> {
    Err(TempPostgresError {
        message: message.into(),
        source: Some(source),
    })
}

/// `DATABASE_URL` if set; otherwise the URL of a throw-away server started on first use and
/// shared by the whole process.
pub fn database_url() -> Result<String, TempPostgresError> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.is_empty() {
            return Ok(url);
        }
    }
    static SHARED: OnceLock<Result<TempPostgres, String>> = OnceLock::new();
    // An error cannot be cloned for every caller: each gets its text, cause included.
    let shared = SHARED.get_or_init(|| {
        TempPostgres::start().map_err(|e| match &e.source {
            Some(cause) => format!("{}: {cause}", e.message),
            None => e.message,
        })
    });
    match shared {
        Ok(server) => Ok(server.url()),
        Err(e) => fail(e.clone()),
    }
}

/// Options for a [`TempPostgres`].
// No PartialEq: its settings are a set kept in the order they were given, so a derived
// equality would tell two builders with the same settings apart.
#[derive(Debug, Clone)]
pub struct TempPostgresBuilder {
    settings: Vec<(String, String)>,
}

impl Default for TempPostgresBuilder {
    /// `fsync=off` (a throw-away server needs no durability, and tests run faster) and
    /// `max_connections=200`.
    fn default() -> Self {
        TempPostgresBuilder {
            settings: vec![
                ("fsync".into(), "off".into()),
                ("max_connections".into(), "200".into()),
            ],
        }
    }
}

impl TempPostgresBuilder {
    /// Sets a server setting (`postgres -c name=value`), replacing an earlier value; for
    /// benchmarks, `setting("fsync", "on")` restores durable commits.
    #[must_use]
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Initialises and starts the server, and waits until it accepts connections.
    pub fn start(self) -> Result<TempPostgres, TempPostgresError> {
        TempPostgres::start_with(self)
    }
}

/// A PostgreSQL server in a temporary directory, stopped and removed on drop, or when the
/// process exits.
///
/// Cleanup is done by a small watchdog shell process that waits for its standard input to
/// close: that happens on drop, and also when this process dies in any way, so no server or
/// directory is left behind.
// No PartialEq: a running server (a process and a directory), not a value.
pub struct TempPostgres {
    dir: PathBuf,
    port: u16,
    /// The superuser's password: random, set at initdb, required on every connection.
    password: String,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    settings: Vec<(String, String)>,
    server: Option<Child>,
    /// Always there until drop (an Option to be taken there).
    watchdog: Option<Watchdog>,
}

impl fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempPostgres")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TempPostgres {
    /// Starts a server with the default settings.
    pub fn start() -> Result<TempPostgres, TempPostgresError> {
        Self::builder().start()
    }

    /// Options for a server.
    pub fn builder() -> TempPostgresBuilder {
        TempPostgresBuilder::default()
    }

    fn start_with(options: TempPostgresBuilder) -> Result<TempPostgres, TempPostgresError> {
        let bin = match find_bindir() {
            Some(bin) => bin,
            None => return fail(INSTALL_HINT),
        };
        let PrivateDir {
            dir,
            run_as,
            watchdog,
        } = private_dir("troutbox-pg-", "postgres", "INT")?;
        let mut server = TempPostgres {
            dir,
            port: 0,
            password: random_password()?,
            bin,
            run_as,
            settings: options.settings,
            server: None,
            watchdog: Some(watchdog),
        };
        server.initdb()?;
        server.start_server()?;
        Ok(server)
    }

    /// A connection string for the superuser `postgres` on database `postgres`, with its
    /// password: the server accepts no connection without it.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname=postgres connect_timeout=10",
            self.port, self.password
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

    /// Stops the server with a fast shutdown (open sessions are ended), keeping its data.
    /// For tests that need the database to go away and come back.
    pub fn stop_server(&mut self) -> Result<(), TempPostgresError> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .or_else(|e| fail_io("cannot run kill", e))?;
        if !status.success() {
            return fail("kill -INT on the server failed");
        }
        child
            .wait()
            .or_else(|e| fail_io("waiting for the server", e))?;
        self.unwatch();
        Ok(())
    }

    /// Starts the server again after [`stop_server`](Self::stop_server), on the same port.
    pub fn start_server(&mut self) -> Result<(), TempPostgresError> {
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
                Err(e) if !fixed_port && e.message.contains("could not bind") => continue,
                Err(e) => return Err(e),
            }
        }
        fail("could not find a free port for PostgreSQL")
    }

    fn unwatch(&mut self) {
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.unwatch();
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        // A clean environment: the server must not inherit the caller's secrets (a CI
        // job's tokens, a cloud key).
        cmd.current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn initdb(&self) -> Result<(), TempPostgresError> {
        // The password goes through a file in the private directory, readable by the
        // server's account only, removed right after.
        let pwfile = self.dir.join("pwfile");
        write_private(&pwfile, self.password.as_bytes(), self.run_as)?;
        let output = self
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "--pwfile=pwfile",
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .or_else(|e| {
                fail(format!(
                    "cannot run {}: {e}",
                    self.bin.join("initdb").display()
                ))
            })?;
        let _ = fs::remove_file(&pwfile);
        if !output.status.success() {
            return fail(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(())
    }

    fn spawn_server(&mut self) -> Result<(), TempPostgresError> {
        let log_path = self.dir.join("server.log");
        let log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .or_else(|e| fail_io(format!("cannot create {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .or_else(|e| fail_io("cannot duplicate the log file handle", e))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg("data");
        cmd.args([
            "-p",
            &self.port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
        ]);
        cmd.arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()));
        for (name, value) in &self.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .or_else(|e| fail_io("cannot start postgres", e))?;
        if let Some(watchdog) = &mut self.watchdog {
            if let Err(e) = watchdog.watch(child.id()) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.unwatch();
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return fail(format!("postgres exited with {status}: {}", log.trim()));
            }
            if postgres::Client::connect(&self.url(), postgres::NoTls).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.unwatch();
                return fail(format!(
                    "postgres did not accept connections within 60 s; see {}",
                    log_path.display()
                ));
            }
            // Polling a starting server: there is no event to wait on.
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(child);
        Ok(())
    }
}

impl Drop for TempPostgres {
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

/// What [`private_dir`] made.
struct PrivateDir {
    dir: PathBuf,
    /// The uid and gid to run the server as, when this process runs as root.
    run_as: Option<(u32, u32)>,
    watchdog: Watchdog,
}

/// A private directory for a server: a random name under the system's temporary directory,
/// created atomically with mode 0700 (an existing directory or link of that name is never
/// reused), so no other local user can read the data, the log or the socket, or plant
/// anything in it. When this process runs as root, the directory is handed to `account`
/// (else `nobody`), returned as the uid and gid to run the server as. Its [`Watchdog`]
/// (which stops servers with `signal`) watches it from the start.
fn private_dir(prefix: &str, account: &str, signal: &str) -> Result<PrivateDir, Failure> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir()
        .or_else(|e| failure("cannot create a temporary directory", e))?
        .keep();
    let watchdog = match Watchdog::spawn(signal, &dir) {
        Ok(watchdog) => watchdog,
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let owner = fs::metadata(&dir).map(|m| m.uid()).unwrap_or(1);
    let run_as = if owner == 0 {
        Some(unprivileged_account(account))
    } else {
        None
    };
    if let Some((uid, gid)) = run_as {
        // Through the open directory, not its path: nothing can swap a link in.
        let handle = fs::File::open(&dir)
            .or_else(|e| failure(format!("cannot open {}", dir.display()), e))?;
        fchown(&handle, Some(uid), Some(gid))
            .or_else(|e| failure(format!("cannot hand {} to uid {uid}", dir.display()), e))?;
    }
    Ok(PrivateDir {
        dir,
        run_as,
        watchdog,
    })
}

/// The cleanup of a server's directory, from its creation on: a shell that waits for its
/// standard input to close (our drop, or our death, in any way), then stops the server it
/// was told of, if any, with `signal` (its fast or clean shutdown: `INT` for PostgreSQL,
/// `TERM` for MariaDB; `KILL` after 30 s), and removes the directory (trying again for
/// 10 s while something, such as an installer killed with us, still writes there). Lines on its stdin
/// tell it the running server's pid (`pid N`) and that no server runs (`none`: stopped,
/// killed, or a start that failed), so a test process dying while installing the server or
/// between a stop and a restart leaves nothing behind either.
///
/// It ignores SIGHUP, SIGINT and SIGTERM: a Ctrl-C in a terminal (or a CI runner stopping a
/// job) signals the whole process group, watchdog included, and the watchdog must outlive
/// the test process to clean up after it.
struct Watchdog {
    process: Child,
    stdin: ChildStdin,
}

impl Watchdog {
    fn spawn(signal: &str, dir: &Path) -> Result<Watchdog, Failure> {
        let script = r#"
            trap '' HUP INT TERM
            pid=
            while read -r word arg; do
                case "$word" in
                    pid) pid=$arg ;;
                    none) pid= ;;
                esac
            done
            if [ -n "$pid" ]; then
                kill -"$SERVER_SIGNAL" "$pid" 2>/dev/null
                i=0
                while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
                kill -KILL "$pid" 2>/dev/null
            fi
            # Again while something still writes there (an installer killed with us, still
            # exiting), for 10 s at most.
            i=0
            while ! rm -rf "$SERVER_DIR" 2>/dev/null || [ -e "$SERVER_DIR" ]; do
                [ $i -lt 100 ] || break
                sleep 0.1
                i=$((i+1))
            done
        "#;
        let mut process = Command::new("sh")
            .args(["-c", script])
            .env("SERVER_SIGNAL", signal)
            .env("SERVER_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .or_else(|e| failure("cannot start the cleanup watchdog", e))?;
        let stdin = process.stdin.take().expect("stdin was piped");
        Ok(Watchdog { process, stdin })
    }

    /// The server now running, to stop at the end.
    fn watch(&mut self, pid: u32) -> Result<(), Failure> {
        writeln!(self.stdin, "pid {pid}").or_else(|e| failure("the cleanup watchdog is gone", e))
    }

    /// No server runs any more: only the directory is left to remove.
    fn unwatch(&mut self) {
        let _ = writeln!(self.stdin, "none");
    }

    /// Stops the server, if one runs, and removes the directory; returns when both are done.
    /// The server is reaped as soon as it exits: until then it is a zombie that the
    /// watchdog's `kill -0` still sees alive, and it would wait out its full grace period.
    fn finish(self, server: Option<Child>) {
        let Watchdog { mut process, stdin } = self;
        drop(stdin);
        if let Some(mut server) = server {
            let _ = server.wait();
        }
        let _ = process.wait();
    }
}

/// 32 hexadecimal digits from the system's random source.
fn random_password() -> Result<String, Failure> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .or_else(|e| failure("cannot read /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `content` to a new file of mode 0600 (owned by `owner` when given).
fn write_private(path: &Path, content: &[u8], owner: Option<(u32, u32)>) -> Result<(), Failure> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .or_else(|e| failure(format!("cannot create {}", path.display()), e))?;
    file.write_all(content)
        .or_else(|e| failure(format!("cannot write {}", path.display()), e))?;
    if let Some((uid, gid)) = owner {
        fchown(&file, Some(uid), Some(gid))
            .or_else(|e| failure(format!("cannot hand {} to uid {uid}", path.display()), e))?;
    }
    Ok(())
}

fn free_port() -> Result<u16, Failure> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .or_else(|e| failure("cannot find a free port", e))
}

/// The uid and gid of `account` (the server package's system account), else `nobody`, from
/// /etc/passwd.
fn unprivileged_account(account: &str) -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let lookup = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == name {
                Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
            } else {
                None
            }
        })
    };
    lookup(account)
        .or_else(|| lookup("nobody"))
        .unwrap_or((65534, 65534))
}

fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                // Resolve symlinks (Debian links a few binaries into /usr/bin or elsewhere).
                let real = fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                match real {
                    Some(real) if has_server(&real) => return Some(real),
                    _ => return Some(dir),
                }
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
