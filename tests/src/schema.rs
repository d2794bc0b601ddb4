//! Validation of events against the published event schema, `docs/events.schema.json`: the
//! same file users get, so a test that validates real events keeps the docs honest.

use std::{path::PathBuf, sync::OnceLock};

use jsonschema::Validator;
use serde_json::Value;

/// Path of the event schema in the source tree.
pub fn schema_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/events.schema.json")
}

fn validator() -> Result<&'static Validator, String> {
    static VALIDATOR: OnceLock<Result<Validator, String>> = OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            let path = schema_path();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let schema: Value = serde_json::from_str(&text)
                .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
            jsonschema::meta::validate(&schema)
                .map_err(|e| format!("{} is not a valid JSON Schema: {e}", path.display()))?;
            jsonschema::draft202012::new(&schema)
                .map_err(|e| format!("{} does not compile: {e}", path.display()))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Checks one event (one parsed line of the event stream) against `docs/events.schema.json`.
/// The error lists every violation with its JSON pointer, and the event itself.
pub fn validate_event(event: &Value) -> Result<(), String> {
    let validator = validator()?;
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("  at {}: {e}", if at.is_empty() { "/" } else { &at })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "event does not match docs/events.schema.json:\n{}\nevent: {event}",
            errors.join("\n")
        ))
    }
}
