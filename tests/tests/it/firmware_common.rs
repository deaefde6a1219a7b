//! Helpers of the firmware build tests (build_firmware, build_secure_boot): a kit image served
//! as a `url` source from loopback and built through firmware, its module checked, a clone of
//! it run, and a build that must fail fast.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::build_common::*;
use kiln_e2e::firmware_image;
use kiln_e2e::module::{clone_run_exec, CloneExec};

pub(crate) const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub(crate) const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// A disk without a boot loader must fail well before the build's boot timeout (10 min
/// below): the firmware says so within seconds, even under TCG on a busy host.
pub(crate) const FAST_FAILURE: Duration = Duration::from_secs(150);

/// The kiln binary when this host can run the firmware builds, else None with a SKIP line.
pub(crate) fn prereqs(test: &str, firmware_file: &str) -> Option<PathBuf> {
    let kiln = match boot_prereqs() {
        Ok(k) => k,
        Err(why) => {
            kiln_e2e::skip(format_args!("{test}: {why}"));
            return None;
        }
    };
    if !Path::new(firmware_file).is_file() {
        kiln_e2e::skip(format_args!(
            "{test}: {firmware_file} is missing (Debian packages seabios, ovmf)"
        ));
        return None;
    }
    for t in ["qemu-img", "sha256sum"] {
        if !on_path(t) {
            kiln_e2e::skip(format_args!("{test}: {t} is not installed"));
            return None;
        }
    }
    Some(kiln)
}

pub(crate) fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `raw` as a compressed qcow2 in `dir`, served on loopback: (server, url, sha256).
pub(crate) fn serve_as_qcow2(raw: &Path, dir: &Path) -> (kiln_e2e::http::Server, String, String) {
    let q = dir.join("image.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(raw)
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert");
    let sum = sha256(&q);
    let server = kiln_e2e::http::Server::file(q);
    let url = format!("http://127.0.0.1:{}/image.qcow2", server.port);
    (server, url, sum)
}

/// `kiln build` on the qemu engine with the test's own cache (the download goes through the
/// loopback server) and more environment.
pub(crate) fn build(kiln: &Path, manifest: &Path, tmp: &Path, env: &[(&str, &Path)]) -> Output {
    let modules = tmp.join("modules");
    let cache = tmp.join("cache");
    let mut all = vec![("KILN_CACHE", cache.as_path())];
    all.extend_from_slice(env);
    run_kiln_with(
        kiln,
        &[
            "build",
            manifest.to_str().unwrap(),
            "--output",
            modules.to_str().unwrap(),
            "--engine",
            "qemu",
        ],
        &all,
    )
}

/// Writes `<dir>/<name>.yaml` (module `name`): one VM over `url`, with `extra` VM fields and
/// `steps`.
pub(crate) fn manifest(
    dir: &Path,
    name: &str,
    vm: &str,
    (url, sum): (&str, &str),
    extra: &str,
    steps: &str,
) -> PathBuf {
    let m = dir.join(format!("{name}.yaml"));
    let text = format!(
        "vms:\n  - name: {vm}\n    source:\n      url: {url}\n      checksum: sha256:{sum}\n    resources: {{ cpu: 2, memory: 1Gi }}\n    disks:\n      - name: root\n        size: 3Gi\n    communicator: {{ sshTimeout: 10m }}\n    cloudInit: {{}}\n{extra}    provisioners:\n{steps}files:\n  - name: motd\n    inline: \"built through firmware\\n\"\n"
    );
    std::fs::write(&m, text).unwrap();
    m
}

/// Checks a successful firmware build's module: the disk is clean, module.yaml's firmware
/// record says what was booted; returns module.yaml.
pub(crate) fn check_module(tmp: &Path, name: &str, vm: &str, firmware: &str) -> String {
    let module = tmp.join("modules").join(name);
    let yaml = std::fs::read_to_string(module.join("module.yaml")).unwrap();
    let disk = module.join(format!("disks/{vm}-root.qcow2"));
    qemu_img_check(&disk).unwrap_or_else(|e| panic!("qemu-img check {}: {e}", disk.display()));
    assert!(
        yaml.contains(&format!("firmware: {firmware}")) && yaml.contains("booted: true"),
        "the firmware record: {yaml}"
    );
    // No kernel of kiln's: the firmware boots the disk's own loader.
    assert!(!module.join("boot").join(vm).exists(), "{yaml}");
    yaml
}

/// One real build of a kit image through firmware.
pub(crate) struct ImageBuild {
    pub(crate) test: &'static str,
    pub(crate) firmware_file: &'static str,
    pub(crate) image: fn() -> kiln_e2e::Result<PathBuf>,
    pub(crate) module: &'static str,
    pub(crate) vm: &'static str,
    pub(crate) extra: &'static str,
    pub(crate) steps: String,
}

/// Builds it (the image served as a compressed qcow2 from loopback); returns the temp folder
/// holding `modules/` and the build's output, or None once the SKIP reason is printed.
pub(crate) fn build_image(b: ImageBuild) -> Option<(tempfile::TempDir, String)> {
    let kiln = prereqs(b.test, b.firmware_file)?;
    if let Some(why) = firmware_image::cannot_build() {
        kiln_e2e::skip(format_args!("{}: {why}", b.test));
        return None;
    }
    let raw = (b.image)().unwrap_or_else(|e| panic!("{}: the image: {e}", b.test));
    let tmp = tempfile::tempdir().unwrap();
    let (server, url, sum) = serve_as_qcow2(&raw, tmp.path());
    let m = manifest(tmp.path(), b.module, b.vm, (&url, &sum), b.extra, &b.steps);
    let start = Instant::now();
    let out = build(&kiln, &m, tmp.path(), &[]);
    eprintln!("{}: build {:.0} s", b.test, start.elapsed().as_secs_f64());
    assert!(out.status.success(), "kiln build failed");
    assert!(server.hits() >= 1, "the url was never fetched");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((tmp, text))
}

/// The step of a build that must fail before it.
pub(crate) const NEVER: &str =
    "      - name: never\n        type: shell\n        shell: { inline: \"true\" }\n";

/// `kiln clone` of module `module` (built into `tmp/modules`), `kiln run` of the clone, and
/// `kiln exec` of `argv` in its VM `vm`: the output of the exec, which must succeed.
pub(crate) fn clone_run(kiln: &Path, tmp: &Path, module: &str, vm: &str, argv: &[&str]) -> String {
    let cache = tmp.join("cache");
    let t = Instant::now();
    let out = clone_run_exec(
        &CloneExec {
            kiln,
            module,
            modules: &tmp.join("modules"),
            clones: &tmp.join("clones"),
            count: None,
            vm,
            run_dir: &tmp.join("run"),
            env: &[("KILN_CACHE", cache.as_os_str())],
        },
        argv,
    )
    .unwrap_or_else(|e| panic!("{module}: clone, run, exec {argv:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "{module}: clone, run, exec {argv:?}: {:.0} s\n{stdout}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "kiln exec {argv:?} in the clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Builds manifest `m` (into `tmp/modules`), which must fail with `cause`, naming VM `vm`, well
/// before the boot timeout, leaving no partial module.
pub(crate) fn fails_fast(test: &str, kiln: &Path, m: &Path, tmp: &Path, vm: &str, cause: &str) {
    let start = Instant::now();
    let out = build(kiln, m, tmp, &[]);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("VM `{vm}`: the VM cannot boot")) && err.contains(cause),
        "{err}"
    );
    assert!(err.contains("last serial console lines"), "{err}");
    assert!(
        took < FAST_FAILURE,
        "{test}: took {took:?}, the boot timeout is 10 min"
    );
    eprintln!("{test}: failed in {:.1} s", took.as_secs_f64());
    assert_no_partial_module(&tmp.join("modules"));
}
