//! The SSH communicator: for guests kiln cannot put its agent into (an ISO install, an image
//! without cloud-init), the steps run over the guest's own sshd. [`SshConnector`] opens
//! sessions ([`SshGuest`]) the way the agent's connector does: it retries while the port is
//! closed or no SSH banner comes, but a refused login or a changed host key ends the wait at
//! once. A private current-thread tokio runtime drives russh behind the sync `Guest` trait.

mod session;
mod sftp;
pub mod shell;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use crate::guest::{Connector, Guest, GuestError};
use crate::job::{SshJob, StepShell};

pub use session::{ExecOptions, SshGuest};

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("SSH: the guest refused {method} authentication for `{user}`")]
    AuthRejected { user: String, method: &'static str },
    #[error(
        "SSH: the guest's host key changed: it was {was} and is now {now} (another machine, \
         or something in between): refusing to connect"
    )]
    HostKeyChanged { was: String, now: String },
    #[error("SSH: reading the private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: russh::keys::Error,
    },
    #[error(
        "SSH: no password and no private key for `{0}`: set `sshPassword` or `sshPrivateKeySecret`"
    )]
    NoCredentials(String),
}

/// How kiln logs in.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub password: Option<String>,
    pub key: Option<Arc<PrivateKey>>,
    pub shell: StepShell,
}

impl Login {
    /// The login a VM's `communicator` describes; its key file read now, so a bad one is
    /// reported before any boot wait.
    pub fn from_job(job: &SshJob) -> Result<Login, SshError> {
        let key = match &job.private_key {
            Some(p) => Some(Arc::new(load_key(p)?)),
            None => None,
        };
        let password = job.password.as_ref().map(|s| s.expose().to_string());
        if key.is_none() && password.is_none() {
            return Err(SshError::NoCredentials(job.username.clone()));
        }
        Ok(Login {
            user: job.username.clone(),
            password,
            key,
            shell: job.shell,
        })
    }
}

/// Reads an OpenSSH private key file (unencrypted: there is nobody to ask a passphrase).
pub fn load_key(path: &Path) -> Result<PrivateKey, SshError> {
    russh::keys::load_secret_key(path, None).map_err(|source| SshError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// Where the guest's sshd is reached: a fixed address, or one found once the guest has an
/// address (a DHCP lease, then a loopback port forward into the module network).
pub type Address<'a> = Box<dyn Fn() -> Result<SocketAddr, GuestError> + Send + Sync + 'a>;

/// Opens SSH sessions to one guest; remembers the host key the first one saw.
pub struct SshConnector<'a> {
    rt: Arc<tokio::runtime::Runtime>,
    address: Address<'a>,
    login: Login,
    host_key: Arc<Mutex<Option<String>>>,
    /// Told the host key's fingerprint the first time it is seen (the build log).
    on_host_key: Box<dyn Fn(&str) + Send + Sync + 'a>,
}

impl<'a> SshConnector<'a> {
    pub fn new(
        address: Address<'a>,
        login: Login,
        on_host_key: Box<dyn Fn(&str) + Send + Sync + 'a>,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        Ok(SshConnector {
            rt: Arc::new(rt),
            address,
            login,
            host_key: Arc::default(),
            on_host_key,
        })
    }

    /// The fingerprint (`SHA256:...`) of the host key accepted first, once a session opened.
    pub fn host_key(&self) -> Option<String> {
        self.host_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// russh's callbacks: the server's key is checked against the one seen first.
struct Handler {
    expected: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
}

pub(crate) fn fingerprint(key: &PublicKeyOrCertificate) -> String {
    match key {
        PublicKeyOrCertificate::PublicKey { key, .. } => key.fingerprint(HashAlg::Sha256),
        PublicKeyOrCertificate::Certificate(c) => c.public_key().fingerprint(HashAlg::Sha256),
    }
    .to_string()
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let fp = fingerprint(key);
        let ok = self.expected.as_ref().is_none_or(|e| *e == fp);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        Ok(ok)
    }
}

/// How long a key exchange and login may take once the TCP connection is up.
const HANDSHAKE: Duration = Duration::from_secs(20);

/// Why a try failed: not there yet (retry), or refused for good.
fn not_ready(_waited: Duration, what: impl std::fmt::Display) -> GuestError {
    GuestError::NotAvailable(format!("SSH: {what}"))
}

impl SshConnector<'_> {
    async fn open(&self, addr: SocketAddr, timeout: Duration) -> Result<SshGuest, GuestError> {
        let expected = self.host_key();
        let seen = Arc::new(Mutex::new(None));
        let handler = Handler {
            expected: expected.clone(),
            seen: seen.clone(),
        };
        let config = Arc::new(client::Config {
            // A guest that stops answering (a reboot) is noticed by the step's own timeout or
            // the next request; keepalives find a dead link between steps.
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            nodelay: true,
            ..Default::default()
        });
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| not_ready(timeout, format!("no connection to {addr}")))?
            .map_err(|e| not_ready(timeout, format!("connecting to {addr}: {e}")))?;
        // Once connected the key exchange gets longer than a try: under TCG it alone may take
        // seconds, and a try cut short each time would never log in.
        let slow = timeout.max(HANDSHAKE);
        let handshake =
            tokio::time::timeout(slow, client::connect_stream(config, stream, handler)).await;
        let mut handle = match handshake {
            Err(_) => return Err(not_ready(slow, format!("no SSH handshake from {addr}"))),
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let now = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let (Some(was), Some(now)) = (expected, now) {
                    if was != now {
                        return Err(GuestError::Refused(
                            SshError::HostKeyChanged { was, now }.to_string(),
                        ));
                    }
                }
                return Err(not_ready(timeout, format!("handshake with {addr}: {e}")));
            }
        };
        let fp = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::time::timeout(slow, self.authenticate(&mut handle, slow))
            .await
            .map_err(|_| not_ready(slow, format!("no answer to the login at {addr}")))??;
        if let Some(fp) = fp {
            let mut known = self.host_key.lock().unwrap_or_else(|p| p.into_inner());
            if known.is_none() {
                *known = Some(fp.clone());
                drop(known);
                (self.on_host_key)(&fp);
            }
        }
        Ok(SshGuest::new(self.rt.clone(), handle, self.login.clone()))
    }

    /// Public key first, then password; a refusal of all that was tried is final.
    async fn authenticate(
        &self,
        h: &mut client::Handle<Handler>,
        timeout: Duration,
    ) -> Result<(), GuestError> {
        let user = &self.login.user;
        let fail = |e: russh::Error| not_ready(timeout, format!("logging in: {e}"));
        if let Some(key) = &self.login.key {
            let hash = h.best_supported_rsa_hash().await.map_err(fail)?.flatten();
            let r = h
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
                .map_err(fail)?;
            if r.success() {
                return Ok(());
            }
        }
        if let Some(pw) = &self.login.password {
            let r = h.authenticate_password(user, pw).await.map_err(fail)?;
            if r.success() {
                return Ok(());
            }
        }
        let method = match (&self.login.key, &self.login.password) {
            (Some(_), Some(_)) => "public key and password",
            (Some(_), None) => "public key",
            _ => "password",
        };
        Err(GuestError::Refused(
            SshError::AuthRejected {
                user: user.clone(),
                method,
            }
            .to_string(),
        ))
    }
}

impl SshConnector<'_> {
    /// One try at a session, as [`Connector::connect`], with the SSH guest's own methods.
    pub fn session(&self, timeout: Duration) -> Result<SshGuest, GuestError> {
        let addr = (self.address)()?;
        self.rt.block_on(self.open(addr, timeout))
    }
}

impl Connector for SshConnector<'_> {
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Guest>, GuestError> {
        Ok(Box::new(self.session(timeout)?))
    }
}
