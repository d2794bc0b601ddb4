//! Validation against the published schemas: events against `docs/events.schema.json`, the
//! live table (`GET /api/v1/connections`) against `docs/connections.schema.json`. The same
//! files users get, so a test that validates real output keeps the docs honest.

use std::{path::PathBuf, sync::OnceLock};

use jsonschema::Validator;
use serde_json::Value;

/// Every event `type` the daemon writes (the `type` enum of `docs/events.schema.json`).
pub const EVENT_TYPES: [&str; 8] = [
    "ready",
    "open",
    "close",
    "stall",
    "stall_end",
    "leak",
    "leak_end",
    "lost",
];

/// Path of the event schema in the source tree.
pub fn schema_path() -> PathBuf {
    doc_path("events.schema.json")
}

/// Path of the live-table schema in the source tree.
pub fn connections_schema_path() -> PathBuf {
    doc_path("connections.schema.json")
}

fn doc_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name)
}

/// Reads, checks against the meta-schema and compiles one schema file.
pub fn load_schema(path: &PathBuf) -> Result<(Value, Validator), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let schema: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    jsonschema::meta::validate(&schema)
        .map_err(|e| format!("{} is not a valid JSON Schema: {e}", path.display()))?;
    let validator = jsonschema::draft202012::new(&schema)
        .map_err(|e| format!("{} does not compile: {e}", path.display()))?;
    Ok((schema, validator))
}

fn cached(
    cell: &'static OnceLock<Result<Validator, String>>,
    path: PathBuf,
) -> Result<&'static Validator, String> {
    cell.get_or_init(|| load_schema(&path).map(|(_, v)| v))
        .as_ref()
        .map_err(Clone::clone)
}

fn check(validator: &Validator, instance: &Value, file: &str, what: &str) -> Result<(), String> {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("  at {}: {e}", if at.is_empty() { "/" } else { &at })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what} does not match docs/{file}:\n{}\n{what}: {instance}",
            errors.join("\n")
        ))
    }
}

/// Checks one event (one parsed line of the event stream) against `docs/events.schema.json`.
/// The error lists every violation with its JSON pointer, and the event itself.
pub fn validate_event(event: &Value) -> Result<(), String> {
    static VALIDATOR: OnceLock<Result<Validator, String>> = OnceLock::new();
    let schema = (schema_path(), "events.schema.json");
    check(cached(&VALIDATOR, schema.0)?, event, schema.1, "event")
}

/// Checks a body of `GET /api/v1/connections` against `docs/connections.schema.json`.
pub fn validate_connections(body: &Value) -> Result<(), String> {
    static VALIDATOR: OnceLock<Result<Validator, String>> = OnceLock::new();
    let schema = (connections_schema_path(), "connections.schema.json");
    check(cached(&VALIDATOR, schema.0)?, body, schema.1, "live table")
}
