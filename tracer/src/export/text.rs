//! `--format text`: one readable line per event, for a person watching a terminal (the JSON
//! stream stays the interface for programs). A pooled connection's line names who is on
//! the other side of the pooler: a leak on PgBouncer's connection to Postgres reads
//! `held by <app>[pid] (container) from <ip:port> ... pins backend <pid>`.

use serde_json::Value;

use crate::export::events::Event;

fn str_of<'v>(e: &'v Value, key: &str) -> &'v str {
    e[key].as_str().unwrap_or("")
}

fn secs(e: &Value, key: &str) -> String {
    e[key]
        .as_f64()
        .map_or_else(|| "?".to_owned(), |s| format!("{s:.1}s"))
}

/// `comm[pid] container:abcdef012345`.
fn who(comm: &str, pid: &Value, container: &Value, runtime: &Value) -> String {
    let mut out = format!("{comm}[{pid}]");
    if let Some(id) = container.as_str() {
        let runtime = runtime.as_str().unwrap_or("container");
        out.push_str(&format!(" {runtime}:{}", &id[..id.len().min(12)]));
    }
    out
}

/// What the connection is paired with through a pooler, if anything.
fn linked(e: &Value) -> String {
    let l = &e["linked"];
    if l.is_null() {
        return String::new();
    }
    let backend = l["backend_pid"]
        .as_u64()
        .map_or(String::new(), |pid| format!(", pins backend {pid}"));
    if l.get("pid").is_some() {
        // A pooler's connection to Postgres: the client holding it.
        let client = match l["comm"].as_str() {
            Some(comm) => who(comm, &l["pid"], &l["container_id"], &Value::Null),
            None => "a remote client".to_owned(),
        };
        let pinned = e["backend_pid"]
            .as_u64()
            .map_or(String::new(), |pid| format!(", pins backend {pid}"));
        format!("  held by {client} from {}{pinned}", str_of(l, "remote"))
    } else {
        format!("  via pooler server conn {}{backend}", str_of(l, "conn_id"))
    }
}

/// The event as one line, without the newline's absence: the line ends with `\n`.
pub fn line(event: &Event) -> String {
    let e = serde_json::to_value(event).unwrap_or(Value::Null);
    let ts = str_of(&e, "ts");
    let time = ts.get(11..23).unwrap_or(ts);
    let kind = str_of(&e, "type");
    let mut out = match kind {
        "ready" => format!(
            "{time} ready      probes {}",
            e["probes"]
                .as_array()
                .map(|p| p
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ),
        "lost" => format!(
            "{time} LOST       {} events ({})",
            e["count"],
            str_of(&e, "where")
        ),
        _ => {
            let mark = match kind {
                "leak" => "LEAK",
                "stall" => "STALL",
                other => other,
            };
            let owner = who(
                str_of(&e, "comm"),
                &e["pid"],
                &e["container_id"],
                &e["container_runtime"],
            );
            let local = str_of(&e, "local");
            let conn = format!(
                "{} -> {}",
                if local.is_empty() { "-" } else { local },
                str_of(&e, "remote")
            );
            let extra = match kind {
                "close" => format!(
                    "after {}, closed by {}",
                    secs(&e, "duration_s"),
                    str_of(&e, "closed_by")
                ),
                "stall" => format!("waiting {} for an answer", secs(&e, "waiting_s")),
                "stall_end" => format!("answered after {}", secs(&e, "waited_s")),
                "leak" => format!(
                    "{}, idle {}, age {}",
                    str_of(&e, "reason"),
                    secs(&e, "idle_s"),
                    secs(&e, "age_s")
                ),
                "leak_end" => format!(
                    "{} over after {}",
                    str_of(&e, "reason"),
                    secs(&e, "lasted_s")
                ),
                _ => String::new(),
            };
            format!(
                "{time} {mark:<10} {:<6} {owner:<36} {conn:<44} {extra}{}",
                str_of(&e, "role"),
                linked(&e)
            )
        }
    };
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests;
