//! Provisioners: the steps run in a VM after it boots.

use super::files::CONFIG_REF;
use super::{f, req, Obj, Ty};

pub const PROVISIONER_TYPES: &[&str] = &["shell", "file", "reboot", "windows-update", "handbuild"];

pub static PROVISIONER: Obj = Obj {
    id: "Provisioner",
    what: "provisioner",
    fields: &[
        f("name", Ty::Str, "shown in logs"),
        req("type", Ty::Enum(PROVISIONER_TYPES), "the kind of step"),
        f("stepTimeout", Ty::Duration, "bounds this step"),
        f(
            "cache",
            Ty::Bool,
            "kiln extension: false runs this step (and every step after it) on every build, never from the step cache (default true)",
        ),
        f("shell", Ty::Obj(&SHELL), "for type shell"),
        f("file", Ty::Obj(&FILE_STEP), "for type file"),
        f("reboot", Ty::Obj(&REBOOT), "for type reboot"),
        f(
            "windowsUpdate",
            Ty::Obj(&WINDOWS_UPDATE),
            "for type windows-update",
        ),
        f("handbuild", Ty::Obj(&HANDBUILD), "for type handbuild"),
    ],
};

pub static SHELL: Obj = Obj {
    id: "ShellStep",
    what: "shell step",
    fields: &[
        f("inline", Ty::Str, "the script"),
        f(
            "scriptFrom",
            Ty::Obj(&CONFIG_REF),
            "the script from a local file",
        ),
        f("env", Ty::Env, "environment variables"),
        f(
            "executeCommand",
            Ty::Str,
            "wraps the script; {{ .Command }} is the placeholder",
        ),
    ],
};

pub static FILE_STEP: Obj = Obj {
    id: "FileStep",
    what: "file step",
    fields: &[
        f("fileRef", Ty::Str, "a files[] entry"),
        f("source", Ty::Obj(&CONFIG_REF), "a local file"),
        req("destination", Ty::Str, "an absolute guest path"),
    ],
};

pub static REBOOT: Obj = Obj {
    id: "RebootStep",
    what: "reboot step",
    fields: &[f(
        "command",
        Ty::Str,
        "default `reboot` (bash) or `shutdown /r /f /t 0` (powershell)",
    )],
};

pub static WINDOWS_UPDATE: Obj = Obj {
    id: "WindowsUpdateStep",
    what: "windowsUpdate step",
    fields: &[
        f("searchCriteria", Ty::Str, "Windows Update search criteria"),
        f("filters", Ty::List(&Ty::Str), "update filters"),
        f(
            "updateLimit",
            Ty::Int {
                min: 0,
                max: 100_000,
            },
            "maximum updates",
        ),
    ],
};

pub static HANDBUILD: Obj = Obj {
    id: "HandbuildStep",
    what: "handbuild step",
    fields: &[req("instructions", Ty::Str, "what to do on the console")],
};
