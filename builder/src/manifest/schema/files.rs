//! Files a manifest brings along, and references to local files (`configMapRef`,
//! `secretRef`).

use super::{f, req, Obj, Ty};

pub static FILE_LIST: Obj = Obj {
    id: "FileList",
    what: "file list",
    fields: &[f(
        "files",
        Ty::List(&Ty::Obj(&NAME_REF)),
        "names of files[] entries",
    )],
};

pub static NAME_REF: Obj = Obj {
    id: "FileName",
    what: "file reference",
    fields: &[req("name", Ty::Str, "a files[] entry")],
};

pub static FILE: Obj = Obj {
    id: "File",
    what: "file",
    fields: &[
        req("name", Ty::Str, "the file name wherever it lands"),
        f("inline", Ty::Str, "the contents"),
        f("url", Ty::Str, "where to download the contents"),
    ],
};

pub static REF: Obj = Obj {
    id: "Ref",
    what: "reference",
    fields: &[
        req(
            "name",
            Ty::Str,
            "read by kiln as a path relative to the manifest",
        ),
        f("key", Ty::Str, "a file inside the directory `name`"),
    ],
};

pub static CONFIG_REF: Obj = Obj {
    id: "ConfigRef",
    what: "ConfigMap/Secret reference",
    fields: &[
        f("configMapRef", Ty::Obj(&REF), "read as a local file"),
        f("secretRef", Ty::Obj(&REF), "read as a local file"),
    ],
};
