//! `GET /api/schema`: the manifest's JSON Schema, the same document `kiln schema` prints, for
//! the YAML editor's completion and hover help. It is built from static tables, so it is made
//! once and served from memory.

use std::sync::OnceLock;

use serde_json::Value;

use crate::manifest::json_schema::json_schema;

/// The schema, built on first use.
pub fn get() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(json_schema)
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_the_schema_kiln_schema_prints() {
        let s = super::get();
        assert_eq!(s, &crate::manifest::json_schema::json_schema());
        assert!(s["$defs"]["VM"]["properties"]["resources"].is_object());
    }
}
