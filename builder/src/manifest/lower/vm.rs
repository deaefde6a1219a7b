//! One VM: source, resources, disks, communicator, cloud-init, NICs, boot command, ISOs,
//! floppy and its provisioners.

use std::path::PathBuf;
use std::time::Duration;

use super::super::boot;
use super::super::diag::{Pos, Span};
use super::super::plan::{
    AgentWay, Boot, CloudInit, Communicator, CommunicatorKind, Disk, DiskBus, Efi, Iso, Secret,
    Shell, Source, Vm,
};
use super::super::schema::SOURCE_KINDS;
use super::super::units::format_bytes;
use super::super::yaml::{Kind, Node, Style};
use super::network::{self, Declared, Lowered};
use super::resources::check_resources;
use super::{read, steps, Cx};

/// The ports of q35's AHCI controller, shared by `sata` disks and CD-ROMs.
const AHCI_PORTS: usize = 6;

const SUITES: &[&str] = &[
    "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable",
];

pub fn vm(cx: &mut Cx, n: &Node, net: &Declared) -> Option<Lowered> {
    let name_node = n.get("name")?;
    cx.label(name_node, "VM name");
    let name = name_node.as_str()?.to_string();
    let source = source(cx, n.get("source"), n);
    let cpus = read::node(n, "resources").and_then(|r| read::cpus(r, "cpu"));
    let memory = read::node(n, "resources").and_then(|r| read::bytes(r, "memory"));
    let disks = disks(cx, n);
    let communicator = communicator(cx, n.get("communicator"));
    let cloud_init = n.get("cloudInit").map(|c| cloud_init(cx, c));
    // `None` while the source is unknown (its own error is reported).
    let agent_way = source.as_ref().map(|s| s.agent_way(cloud_init.is_some()));
    let over_ssh = source
        .as_ref()
        .is_some_and(|s| s.over_ssh(communicator.kind, cloud_init.is_some()));
    check_communicator(cx, n, &name, agent_way, &communicator);
    if let (Some(Source::Url { .. }), None, false) = (&source, &cloud_init, over_ssh) {
        if let Some(s) = n.key("source") {
            cx.sink
                .warn(s.span, format!("VM `{name}` boots a downloaded image without `cloudInit`: kiln cannot install its agent, so the image must already have it (images kiln captured do) or the build waits for it until `sshTimeout`"))
                .hint("add `cloudInit: {}` to let kiln install its agent");
        }
    }
    let (nics, nic_at) = if n.get("nics").is_some() {
        network::nics(cx, &name, read::list(n, "nics"), net, &[])
    } else {
        let nic = network::default_nic(cx, &name, net);
        let at = network::NicAt {
            name: name_node.span,
            ip: None,
            mac: None,
        };
        nic.map(|x| (vec![x], vec![at])).unwrap_or_default()
    };
    let boot_command = boot_command(cx, read::list(n, "bootCommand"));
    // Packer's defaults.
    let boot_wait = read::duration(n, "bootWait").unwrap_or(Duration::from_secs(10));
    let boot_key_interval =
        read::duration(n, "bootKeyInterval").unwrap_or(Duration::from_millis(100));
    // By the list written, not the events parsed: a bad token is reported on its own.
    if read::list(n, "bootCommand").is_empty() {
        for key in ["bootWait", "bootKeyInterval"] {
            if let Some(k) = n.key(key) {
                cx.sink
                    .warn(
                        k.span,
                        format!("`{key}` does nothing without a `bootCommand`"),
                    )
                    .hint("remove it, or add the `bootCommand` it paces");
            }
        }
    }
    let efi = n.get("efiFirmware").map(|e| Efi {
        secure_boot: read::boolean(e, "secureBoot").unwrap_or(false),
    });
    let boot = match read::string(n, "boot").as_deref() {
        Some("direct") => Boot::Direct,
        Some("firmware") => Boot::Firmware,
        // `auto`, absent, or a bad value (the schema check reports it where it is written).
        _ => Boot::Auto,
    };
    let isos = isos(cx, read::list(n, "isos"));
    let floppy_files = super::name_refs(cx, n.get("floppy"), "floppy");
    let floppy_bytes: usize = floppy_files
        .iter()
        .filter_map(|f| cx.files.iter().find(|e| &e.name == f))
        .map(|e| match &e.content {
            super::super::plan::FileContent::Inline(s) => s.len(),
            _ => 0,
        })
        .sum();
    if floppy_bytes > 1_400_000 {
        if let Some(f) = n.key("floppy") {
            cx.sink
                .error(f.span, format!("the floppy's inline files hold {floppy_bytes} bytes: a 1.44 MB floppy fits about 1,400,000"))
                .hint("serve large files with httpDirectory instead");
        }
    }
    // q35's AHCI controller has six ports: the sata disks take the first, the CDs the next.
    let sata = disks.iter().filter(|d| d.bus == DiskBus::Sata).count();
    if !isos.is_empty() && sata + isos.len() > AHCI_PORTS {
        if let Some(k) = n.key("isos") {
            cx.sink
                .error(
                    k.span,
                    format!(
                        "{sata} sata disk(s) and {} ISO(s) need {} SATA ports: the VM's AHCI controller has {AHCI_PORTS}",
                        isos.len(),
                        sata + isos.len()
                    ),
                )
                .hint("put some disks on `bus: virtio` or `scsi`, or attach fewer ISOs");
        }
    }
    let provisioners = steps::provisioners(cx, read::list(n, "provisioners"), communicator.shell);
    let vm = Vm {
        name,
        source: source?,
        cpus: cpus?,
        memory: memory?,
        disks,
        communicator,
        cloud_init,
        nics,
        provisioners,
        boot_command,
        boot_wait,
        boot_key_interval,
        isos,
        floppy_files,
        efi,
        boot,
        invisible: read::boolean(n, "invisible").unwrap_or(false),
    };
    if let Some(r) = read::node(n, "resources") {
        check_resources(cx, r, &vm);
    }
    Some(Lowered { vm, nic_at })
}

fn source(cx: &mut Cx, s: Option<&Node>, vm: &Node) -> Option<Source> {
    let s = s?;
    if !matches!(s.kind, Kind::Map(_)) {
        return None;
    }
    let kinds: Vec<&Node> = SOURCE_KINDS.iter().filter_map(|k| s.key(k)).collect();
    match kinds.len() {
        0 => {
            let at = vm.key("source").map_or(s.span, |k| k.span);
            cx.sink
                .error(at, "source has no kind")
                .hint(format!("give exactly one of: {}", SOURCE_KINDS.join(", ")));
            return None;
        }
        1 => {}
        _ => {
            let names: Vec<&str> = kinds.iter().filter_map(|k| k.as_str()).collect();
            cx.sink
                .error(
                    kinds[1].span,
                    format!(
                        "source has {} kinds (`{}`): give exactly one",
                        names.len(),
                        names.join("`, `")
                    ),
                )
                .hint("a source is one of url, blank, buildRef, containerDisk, file, bootstrap");
            return None;
        }
    }
    let kind = kinds[0].as_str()?;
    if kind != "url" {
        if let Some(c) = s.key("checksum") {
            cx.sink
                .error(c.span, "`checksum` belongs to a `url` source")
                .hint("remove it, or use `url:`");
        }
    }
    let v = s.get(kind)?;
    match kind {
        "url" => {
            let url = v.as_str()?.to_string();
            if !read::is_http_url(&url) {
                cx.sink
                    .error(v.span, format!("`{url}` is not an http:// or https:// URL"))
                    .hint("for a local image use `file:` with a path relative to the manifest");
                return None;
            }
            let sha256 = match s.get("checksum") {
                Some(c) => match read::sha256(c.as_str().unwrap_or_default()) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        cx.sink.error(c.span, e);
                        return None;
                    }
                },
                None => None,
            };
            Some(Source::Url { url, sha256 })
        }
        "blank" => Some(Source::Blank),
        "containerDisk" => {
            cx.sink
                .error(
                    v.span,
                    "`containerDisk` sources are not supported by kiln yet",
                )
                .hint("use `url:` with a qcow2 or raw image, or `bootstrap:`");
            None
        }
        "file" => {
            let rel = PathBuf::from(v.as_str()?);
            let path = cx.existing_file(v.span, &rel)?;
            Some(Source::File { path })
        }
        "buildRef" => {
            let name_node = v.get("name")?;
            if !cx.label(name_node, "module name") {
                return None;
            }
            let vm_name = match v.get("vmName") {
                Some(x) => {
                    if !cx.label(x, "VM name") {
                        return None;
                    }
                    x.as_str().map(str::to_string)
                }
                None => None,
            };
            Some(Source::BuildRef {
                name: name_node.as_str()?.to_string(),
                namespace: read::string(v, "namespace"),
                vm_name,
            })
        }
        "bootstrap" => {
            let suite_node = v.get("suite")?;
            let suite = suite_node.as_str()?.to_string();
            if !SUITES.contains(&suite.as_str()) {
                let b = cx
                    .sink
                    .error(suite_node.span, format!("unknown Debian suite `{suite}`"));
                match super::super::suggest::closest(&suite, SUITES.iter().copied()) {
                    Some(c) => b.hint(format!("did you mean `{c}`?")),
                    None => b.hint(format!("known suites: {}", SUITES.join(", "))),
                };
            }
            let mut packages = Vec::new();
            for p in read::list(v, "packages") {
                let Some(name) = p.as_str() else { continue };
                let ok = name.len() >= 2
                    && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
                if !ok {
                    cx.sink
                        .error(p.span, format!("`{name}` is not a Debian package name"))
                        .hint("package names are lowercase letters, digits and + - .");
                } else if packages.iter().any(|x| x == name) {
                    cx.sink
                        .warn(p.span, format!("package `{name}` is listed twice"));
                } else {
                    packages.push(name.to_string());
                }
            }
            let mirror = read::string(v, "mirror");
            if let (Some(m), Some(at)) = (&mirror, v.get("mirror")) {
                if !read::is_http_url(m) {
                    cx.sink.error(
                        at.span,
                        format!("mirror `{m}` is not an http:// or https:// URL"),
                    );
                }
            }
            let kernel = read::string(v, "kernel");
            if let (Some(k), Some(at)) = (&kernel, v.get("kernel")) {
                let ok = k.len() > "linux-image-".len()
                    && k.starts_with("linux-image-")
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
                if !ok {
                    cx.sink
                        .error(at.span, format!("`{k}` is not a Debian kernel package"))
                        .hint("e.g. `kernel: linux-image-amd64` (the default is linux-image-cloud-amd64)");
                }
            }
            Some(Source::Bootstrap {
                distro: read::string(v, "distro")?,
                suite,
                packages,
                mirror,
                kernel,
            })
        }
        _ => None,
    }
}

fn disks(cx: &mut Cx, n: &Node) -> Vec<Disk> {
    let Some(list) = n.get("disks") else {
        return vec![Disk {
            name: "root".into(),
            size: 20 << 30,
            bus: DiskBus::Virtio,
        }];
    };
    let items = list.as_seq().unwrap_or(&[]);
    if items.is_empty() {
        cx.sink
            .error(list.span, "`disks` is empty: a VM needs a boot disk")
            .hint("remove `disks` for the default 20Gi disk");
    }
    let max = cx.limits.max_disks;
    if items.len() > max {
        cx.sink.error(
            items[max].span,
            format!("a VM has at most {max} disks, this one has {}", items.len()),
        );
    }
    cx.unique_names(items, "name", "disk");
    let mut out = Vec::new();
    for d in items {
        let Some(name_node) = d.get("name") else {
            continue;
        };
        cx.label(name_node, "disk name");
        let size = read::bytes(d, "size");
        if let (Some(size), Some(at)) = (size, d.get("size")) {
            if size < (1 << 20) {
                cx.sink
                    .error(
                        at.span,
                        format!("disk size {} is too small", format_bytes(size)),
                    )
                    .hint("sizes take a unit: 20Gi");
            } else if size > cx.limits.max_disk_bytes {
                cx.sink
                    .error(
                        at.span,
                        format!(
                            "disk size {} is more than the limit of {}",
                            format_bytes(size),
                            format_bytes(cx.limits.max_disk_bytes)
                        ),
                    )
                    .hint("the host configuration can raise it with KILN_MAX_DISK_SIZE");
            }
        }
        let bus = match read::string(d, "bus").as_deref() {
            Some("scsi") => DiskBus::Scsi,
            Some("sata") => DiskBus::Sata,
            Some("usb") => DiskBus::Usb,
            _ => DiskBus::Virtio,
        };
        // scsi and sata are served by kiln-disk over NBD on the qemu engine; nothing serves usb.
        if bus == DiskBus::Usb {
            if let Some(at) = d.get("bus") {
                cx.sink
                    .error(at.span, "disk bus `usb` is not supported by kiln yet")
                    .hint(
                        "write `bus: virtio`, or `scsi`/`sata` for a guest without virtio drivers",
                    );
            }
        }
        out.push(Disk {
            name: name_node.as_str().unwrap_or_default().to_string(),
            size: size.unwrap_or(0),
            bus,
        });
    }
    out
}

fn communicator(cx: &mut Cx, c: Option<&Node>) -> Communicator {
    let empty = Node {
        span: Span::default(),
        kind: Kind::Null,
    };
    let c = c.unwrap_or(&empty);
    let kind = match read::string(c, "type").as_deref() {
        Some("ssh") => CommunicatorKind::Ssh,
        _ => CommunicatorKind::Agent,
    };
    let shell = match read::string(c, "shell").as_deref() {
        Some("sh") => Shell::Sh,
        Some("powershell") => Shell::Powershell,
        Some("cmd") => Shell::Cmd,
        _ => Shell::Bash,
    };
    let com = Communicator {
        kind,
        shell,
        ssh_username: read::string(c, "sshUsername").unwrap_or_else(|| "root".into()),
        ssh_port: read::int(c, "sshPort")
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(22),
        ssh_password: read::string(c, "sshPassword").map(Secret::new),
        ssh_timeout: read::duration(c, "sshTimeout").unwrap_or(Duration::from_secs(300)),
        ssh_private_key: read::node(c, "sshPrivateKeySecret").and_then(|r| cx.local_path(r)),
    };
    if com.ssh_timeout.is_zero() {
        if let Some(at) = c.get("sshTimeout") {
            cx.sink
                .error(at.span, "`sshTimeout` cannot be zero: it is how long the build waits for the guest's agent or sshd")
                .hint("e.g. `sshTimeout: 5m` (the default)");
        }
    }
    if let Some(at) = c.get("sshPassword") {
        cx.sink.secret(at.span);
    }
    com
}

/// Refuses what the build would not use: `type: ssh` and the SSH fields where kiln reaches the
/// guest through its agent, and the SSH fields without `type: ssh`; a VM reached over SSH needs
/// a login. `agent_way` is `None` while the source is unknown. `sshTimeout` is the wait for
/// either, so it is never refused; `sshUsername: root`, `sshPort: 22` and `shell: bash` are what
/// the agent does anyway (editors write the defaults out).
fn check_communicator(
    cx: &mut Cx,
    vm: &Node,
    name: &str,
    agent_way: Option<Option<AgentWay>>,
    com: &Communicator,
) {
    let Some(c) = vm.get("communicator") else {
        return;
    };
    let ssh = com.kind == CommunicatorKind::Ssh;
    let set = [
        ("sshUsername", com.ssh_username != "root"),
        ("sshPort", com.ssh_port != 22),
        ("sshPassword", true),
        ("sshPrivateKeySecret", true),
    ];
    let set = set.iter().filter(|(_, differs)| *differs).map(|(k, _)| *k);
    // Where the agent is used the fields have no effect; where it cannot be, they need SSH.
    // RudderVirt writes `type: ssh` and a login for its Existing Image and Disk Image URL
    // sources, and the manifest reference promises those build unchanged on kiln's agent: there
    // a warning says which fields do nothing. A `bootstrap` source is kiln's own: an error.
    let mut only_warn = false;
    let (as_root, with_bash, hint) = match agent_way {
        Some(Some(way)) => {
            only_warn = way != AgentWay::Bootstrap;
            let (source, how) = match way {
                AgentWay::Bootstrap => (
                    "a `bootstrap` source",
                    "kiln puts its agent in the disk it bootstraps",
                ),
                AgentWay::BuildRef => (
                    "a `buildRef` source",
                    "the module's disk carries kiln's agent",
                ),
                AgentWay::CloudInit => (
                    "an image with `cloudInit`",
                    "kiln installs its agent through the cloud-init seed",
                ),
            };
            let no_effect =
                format!("has no effect on {source}: {how}, and the steps run through it");
            // RudderVirt's `type: ssh` is accepted as documented (the agent does its work).
            if let (true, false, Some(at)) = (ssh, only_warn, c.get("type")) {
                cx.sink
                    .error(at.span, format!("VM `{name}`: `type: ssh` {no_effect} as root with bash"))
                    .hint("remove it (the agent is the default); SSH is used only where kiln cannot put its agent in: a `blank` disk, or a `url`/`file` image without `cloudInit`");
            }
            (
                format!("{no_effect} as root, not over SSH"),
                format!("{no_effect} with bash"),
                "remove it",
            )
        }
        _ if !ssh => (
            "needs `type: ssh`: kiln's agent runs steps as root".to_string(),
            "needs `type: ssh`: kiln's agent runs steps with bash".to_string(),
            "write `type: ssh` for a guest reached through its own sshd, or remove it",
        ),
        Some(None) => {
            // A freshly installed guest knows no key kiln could make up: the login must be given.
            let login = c.key("sshPassword").is_some() || c.key("sshPrivateKeySecret").is_some();
            if let (false, Some(k)) = (login, vm.key("communicator")) {
                cx.sink
                    .error(k.span, format!("VM `{name}` is reached over SSH (`type: ssh` and no agent kiln can install) but has neither `sshPassword` nor `sshPrivateKeySecret`"))
                    .hint("give the password the installer sets, or a private key whose public half the image or the installer's answers authorize");
            }
            return;
        }
        None => return,
    };
    for key in set {
        if let Some(k) = c.key(key) {
            let msg = format!("VM `{name}`: `{key}` {as_root}");
            let b = if only_warn {
                cx.sink.warn(k.span, msg)
            } else {
                cx.sink.error(k.span, msg)
            };
            if key == "sshUsername" {
                b.hint(format!("{hint}; to run a step as another user, wrap it: `executeCommand: runuser -u USER -- sh -c '{{{{ .Command }}}}'`"));
            } else {
                b.hint(hint);
            }
        }
    }
    if let (true, Some(at)) = (com.shell != Shell::Bash, c.get("shell")) {
        let msg = format!("VM `{name}`: this `shell` {with_bash}");
        let b = if only_warn {
            cx.sink.warn(at.span, msg)
        } else {
            cx.sink.error(at.span, msg)
        };
        b.hint(hint);
    }
}

/// `cloudInit`: the user's data is `userData` or the file `userDataFrom` names, not both.
fn cloud_init(cx: &mut Cx, c: &Node) -> CloudInit {
    if let (Some(_), Some(from)) = (c.key("userData"), c.key("userDataFrom")) {
        cx.sink
            .error(
                from.span,
                "`cloudInit` has both `userData` and `userDataFrom`",
            )
            .hint("keep one");
    }
    CloudInit {
        user_data: read::string(c, "userData"),
        user_data_from: read::node(c, "userDataFrom").and_then(|r| cx.config_ref(r)),
        network_data: read::string(c, "networkData"),
    }
}

fn boot_command(cx: &mut Cx, items: &[Node]) -> Vec<boot::BootEvent> {
    let mut out = Vec::new();
    for item in items {
        let Some(s) = item.as_str() else { continue };
        match boot::parse(s) {
            Ok(ev) => out.extend(ev),
            Err(e) => {
                let span = token_span(item, s, e.col, e.len);
                let b = cx.sink.error(span, e.message);
                if let Some(h) = e.hint {
                    b.hint(h);
                }
            }
        }
    }
    out
}

/// The source columns of a token inside a one-line scalar (plain or quoted without escapes
/// before it); for other scalars, the scalar itself.
fn token_span(item: &Node, s: &str, col: usize, len: usize) -> Span {
    let single_line = item.span.start.line == item.span.end.line;
    let offset = match &item.kind {
        Kind::Scalar(_, Style::Plain) if single_line => Some(0),
        Kind::Scalar(_, Style::Quoted) if single_line && !s.contains(['\\', '\'', '"']) => Some(1),
        _ => None,
    };
    match offset {
        Some(o) => {
            let start = item.span.start.col + o + col;
            Span {
                start: Pos {
                    line: item.span.start.line,
                    col: start,
                },
                end: Pos {
                    line: item.span.start.line,
                    col: start + len,
                },
            }
        }
        None => item.span,
    }
}

fn isos(cx: &mut Cx, items: &[Node]) -> Vec<Iso> {
    let mut out = Vec::new();
    for i in items {
        let Some(u) = i.get("url") else { continue };
        let Some(url) = u.as_str() else { continue };
        if !read::is_http_url(url) {
            cx.sink
                .error(u.span, format!("`{url}` is not an http:// or https:// URL"));
            continue;
        }
        let sha256 = match i.get("checksum").and_then(Node::as_str) {
            Some(c) => match read::sha256(c) {
                Ok(h) => Some(h),
                Err(e) => {
                    if let Some(at) = i.get("checksum") {
                        cx.sink.error(at.span, e);
                    }
                    continue;
                }
            },
            None => None,
        };
        out.push(Iso {
            url: url.to_string(),
            sha256,
        });
    }
    out
}
