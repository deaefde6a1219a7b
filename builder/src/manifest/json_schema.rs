//! `kiln schema`: a JSON Schema (draft 2020-12) generated from the schema tables, for editor
//! completion and hover docs. Either the bare manifest or the envelope validates.

use serde_json::{json, Map, Value};

use super::schema::{self, Obj, Ty};

pub fn json_schema() -> Value {
    let mut defs = Map::new();
    for obj in schema::ALL {
        defs.insert(obj.id.to_string(), object(obj));
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kiln.invalid/manifest.schema.json",
        "title": "kiln module manifest",
        "description": "A kiln / RudderVirt VirtualMachineBuild manifest: bare, or in a kind: VirtualMachineBuild envelope.",
        "anyOf": [
            {"$ref": format!("#/$defs/{}", schema::SPEC.id)},
            {"$ref": format!("#/$defs/{}", schema::ENVELOPE.id)}
        ],
        "$defs": defs,
    })
}

fn object(obj: &Obj) -> Value {
    let mut props = Map::new();
    for f in obj.fields {
        let mut v = ty(&f.ty);
        if let Value::Object(m) = &mut v {
            let doc = match f.note {
                schema::Note::Ignored(why) => format!("{} (ignored: {why})", f.doc),
                schema::Note::None => f.doc.to_string(),
            };
            m.insert("description".into(), Value::String(doc));
        }
        props.insert(f.name.to_string(), v);
    }
    let required: Vec<&str> = obj
        .fields
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name)
        .collect();
    json!({
        "type": "object",
        "description": obj.what,
        "properties": props,
        "required": required,
        "additionalProperties": false,
    })
}

fn ty(t: &Ty) -> Value {
    match t {
        Ty::Str => json!({"type": ["string", "number", "boolean"]}),
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Int { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        Ty::Duration => json!({
            "type": "string",
            "pattern": "^(0|([0-9]+(\\.[0-9]*)?(ns|us|µs|ms|s|m|h))+)$",
            "examples": ["90s", "30m", "2h"]
        }),
        Ty::Bytes => json!({
            "type": ["string", "integer"],
            "pattern": "^[0-9]+(\\.[0-9]+)?([KMGTPE]i|[kMGTPE]|e[0-9]+)?$",
            "examples": ["512Mi", "4Gi", "20Gi"]
        }),
        Ty::Cpu => json!({
            "type": ["string", "integer"],
            "pattern": "^[0-9]+(\\.[0-9]+)?m?$",
            "examples": [1, 2, "500m"]
        }),
        Ty::Enum(values) => json!({"enum": values}),
        Ty::True => json!({"const": true}),
        Ty::Obj(o) => json!({"$ref": format!("#/$defs/{}", o.id)}),
        Ty::List(item) => json!({"type": "array", "items": ty(item)}),
        Ty::Env => json!({
            "oneOf": [
                {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
                {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*="}}
            ]
        }),
        Ty::Any => json!({}),
    }
}
