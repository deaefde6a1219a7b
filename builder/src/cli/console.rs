//! `kiln console <build>/<vm>`: how to attach to a running build VM's screen (its VNC socket
//! and one-time password), and with `--listen` a loopback TCP port forwarded to that socket,
//! for VNC viewers that cannot open a Unix socket.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use crate::console::{self, Console};

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// `<build>/<vm>` (the build is its module's name or its process id), or a VM name only
    /// one running build has.
    pub target: String,
    /// One JSON object: build, pid, vm, socket, password (and listen).
    #[arg(long)]
    pub json: bool,
    /// Forward this loopback address (e.g. 127.0.0.1:5901) to the VM's VNC socket while the
    /// VM runs, so any VNC viewer can attach to it.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

pub fn console(a: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let root = crate::build::runtime_root()?;
    let c = console::find(&root, &a.target)?;
    let listener = match a.listen {
        // A console is for this host only: the password is weak (VNC's DES, 8 characters).
        Some(addr) if !addr.ip().is_loopback() => {
            bail!("--listen {addr}: only a loopback address (127.0.0.1, ::1) may carry a console")
        }
        Some(addr) => {
            Some(TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?)
        }
        None => None,
    };
    let listen = listener.as_ref().and_then(|l| l.local_addr().ok());
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = serde_json::to_value(&c)?;
        if let Some(addr) = listen {
            v["listen"] = addr.to_string().into();
        }
        writeln!(out, "{v}")?;
    } else {
        describe(&mut out, &c, listen)?;
    }
    out.flush()?;
    drop(out);
    if let Some(l) = listener {
        forward(&l, &c.socket)?;
        eprintln!(
            "the console of `{}/{}` closed: the VM stopped",
            c.build, c.vm
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(
    out: &mut impl std::io::Write,
    c: &Console,
    listen: Option<SocketAddr>,
) -> std::io::Result<()> {
    let sock = c.socket.display();
    writeln!(
        out,
        "console of VM `{}` in build `{}` (pid {})",
        c.vm, c.build, c.pid
    )?;
    writeln!(out, "  socket:   {sock}")?;
    writeln!(
        out,
        "  password: {}   (VNC authentication; made for this VM start)",
        c.password
    )?;
    match listen {
        Some(addr) => writeln!(
            out,
            "forwarding {addr} to it until the VM stops (Ctrl-C ends it): point a VNC viewer at \
             {addr}, e.g. `vncviewer {}::{}`",
            addr.ip(),
            addr.port()
        ),
        None => writeln!(
            out,
            "attach a VNC viewer through a loopback port, with kiln:\n  \
             kiln console {}/{} --listen 127.0.0.1:5901   (then `vncviewer 127.0.0.1::5901`)\n\
             or with socat:\n  \
             socat TCP-LISTEN:5901,bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:{sock}",
            c.build, c.vm
        ),
    }
}

/// Forwards each connection to `l` to the VNC socket until the socket goes away (the VM
/// stopped, the build ended).
fn forward(l: &TcpListener, socket: &Path) -> anyhow::Result<()> {
    l.set_nonblocking(true)?;
    while socket.exists() {
        match l.accept() {
            Ok((tcp, peer)) => {
                tracing::info!("console: connection from {peer}");
                if let Err(e) = tcp
                    .set_nonblocking(false)
                    .and_then(|()| splice(tcp, socket))
                {
                    eprintln!("console: cannot forward a connection from {peer}: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Copies bytes both ways between `tcp` and a fresh connection to the VNC socket, on two
/// threads, until either side closes.
fn splice(tcp: TcpStream, socket: &Path) -> std::io::Result<()> {
    let unix = UnixStream::connect(socket)?;
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(std::net::Shutdown::Both);
        let _ = tcp_r.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut unix_r, &mut tcp_w);
        let _ = tcp_w.shutdown(std::net::Shutdown::Both);
        let _ = unix_r.shutdown(std::net::Shutdown::Both);
    });
    Ok(())
}
