//! The config file's JSON Schema, generated from the serde types the loader uses
//! ([`super::file`]), so it cannot drift from what is accepted; and the list of every key path
//! in it, which docs/configuration.md is checked against.

use serde_json::Value;

use super::file::FileConfig;

/// The JSON Schema (draft 2020-12) of the config file.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(FileConfig)).unwrap_or(Value::Null)
}

/// Every key path the schema allows, written the way the docs write them: `[]` for list items,
/// `<name>` for map keys (`upstreams.<name>.tls.ca_file`, `routes[].match.host`).
pub fn key_paths() -> Vec<String> {
    let schema = schema();
    let mut out = Vec::new();
    walk(&schema, &schema, "", &mut out);
    out
}

/// Adds the keys below `node` (a schema object) to `out`, prefixed with `path`.
fn walk(root: &Value, node: &Value, path: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            let p = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            out.push(p.clone());
            walk(root, sub, &p, out);
        }
    }
    if let Some(items) = node.get("items") {
        walk(root, items, &format!("{path}[]"), out);
    }
    if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
        // The name itself is a key the user writes (`upstreams.app`).
        let p = format!("{path}.<name>");
        out.push(p.clone());
        walk(root, values, &p, out);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for alt in node
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            walk(root, alt, path, out);
        }
    }
}

/// Follows a local `$ref` (`#/$defs/Name`).
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix("#/")
            .map(|p| p.split('/').fold(root, |v, seg| &v[seg]))
            .filter(|v| !v.is_null())
            .unwrap_or(node),
        None => node,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn key_paths_cover_nested_lists_maps_and_options() {
        let paths = key_paths();
        for want in [
            "server_id",
            "listeners[].tls.alpn",
            "upstreams.<name>",
            "upstreams.<name>.tls.ca_file",
            "routes[].match.path_prefix",
            "routes[].concurrency.adaptive.max",
            "defaults.circuit_breaker.failure_codes",
            "shutdown.drain_timeout",
        ] {
            assert!(
                paths.iter().any(|p| p == want),
                "{want} missing from {paths:?}"
            );
        }
    }

    /// docs/configuration.md documents exactly the keys the loader accepts: every key is a row
    /// (its path in backticks, first cell), and every row names a key. A route's policy keys
    /// are documented once, as `defaults.…`.
    #[test]
    fn the_configuration_reference_lists_every_key_and_no_other() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
        )
        .expect("docs/configuration.md");
        let documented: BTreeSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`'))
            .map(|(key, _)| key.to_owned())
            .collect();
        let policy: BTreeSet<String> = key_paths()
            .into_iter()
            .filter_map(|p| p.strip_prefix("defaults.").map(str::to_owned))
            .collect();
        let expected: BTreeSet<String> = key_paths()
            .into_iter()
            .filter(|p| {
                // routes[].timeout and the like: documented as defaults.timeout.
                !p.strip_prefix("routes[].")
                    .is_some_and(|k| policy.contains(k))
            })
            .collect();
        let missing: Vec<_> = expected.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&expected).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "docs/configuration.md is out of date.\n  keys without a row: {missing:?}\n  rows that are no key: {unknown:?}"
        );
    }
}
