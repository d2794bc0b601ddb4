//! What of a process's command line the tracer may emit: owns `--cmdline full|redacted|off`,
//! the hiding of SQL given to psql, and the redaction of credentials. Every `cmdline` the
//! tracer writes (events, `tracer list`, logs) is made here, from the raw argv, before it is
//! stored anywhere.
//!
//! Redaction replaces only the secret with `<redacted>` and keeps the rest readable:
//! - URI passwords, any scheme: `postgresql://user:<redacted>@host/db`;
//! - `KEY=VALUE` pairs whose key names a secret (contains `password`, `passwd`, `pwd`,
//!   `secret`, `token` or `apikey`, any case, `_`/`-`/`.` ignored): whole arguments
//!   (`PGPASSWORD=...` given to `env`, `-Dspring.datasource.password=...`), libpq conninfo
//!   pairs (`host=db password='x y'`, quoted values too) and URI query parameters
//!   (`?user=app&password=...`);
//! - the value of `--password`, `--*-password`, `--*-secret`, `--*-token` (and the other
//!   secret words) flags, as `--flag VALUE` and `--flag=VALUE`.
//!
//! Look-alikes stay: `--password-file PATH`, `--no-password`, psql's `--password` (a switch
//! that makes psql prompt, so the next argument is not a password), `PWD=/dir`.
//! Query text never appears, whatever the mode (the SPEC: it can hold secrets).

use serde::Serialize;

/// What `cmdline` carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CmdlineMode {
    /// The arguments as they are (SQL still hidden).
    Full,
    /// Credentials replaced by [`REDACTED`].
    #[default]
    Redacted,
    /// No command line at all (`cmdline` is null).
    Off,
}

impl CmdlineMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "redacted" => Ok(Self::Redacted),
            "off" => Ok(Self::Off),
            _ => Err("expected full, redacted or off".into()),
        }
    }
}

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";
/// What replaces SQL on a psql command line.
pub const SQL: &str = "<sql>";

/// The `cmdline` field for `args` (argv, `/proc/<pid>/cmdline` split at NULs): arguments
/// joined by spaces, or `None` when there are none or `mode` is off.
pub fn cmdline(args: &[String], mode: CmdlineMode) -> Option<String> {
    if args.is_empty() || mode == CmdlineMode::Off {
        return None;
    }
    // Credentials first: hiding SQL replaces whole arguments, which must not shift what the
    // credential rules see (`psql -c --db-password X` hides both).
    let args = match mode {
        CmdlineMode::Redacted => redact_credentials(args),
        _ => args.to_vec(),
    };
    Some(redact_sql(&args).join(" "))
}

/// The program's file name (`/usr/bin/psql` -> `psql`).
fn program_name(args: &[String]) -> &str {
    args.first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("")
}

/// Hides SQL given on a psql command line (`psql -c '...'`, `--command=...`).
pub fn redact_sql(args: &[String]) -> Vec<String> {
    if !program_name(args).starts_with("psql") {
        return args.to_vec();
    }
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for arg in args {
        if hide_next {
            out.push(SQL.to_owned());
            hide_next = false;
        } else if arg == "-c" || arg == "--command" {
            out.push(arg.clone());
            hide_next = true;
        } else if arg.starts_with("--command=") {
            out.push(format!("--command={SQL}"));
        } else if arg.len() > 2 && arg.starts_with("-c") {
            out.push(format!("-c{SQL}"));
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// Whether `key` (of `KEY=VALUE`, or a flag's name) names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let plain: String = key
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    // The shell's working directories, not passwords.
    if plain == "pwd" || plain == "oldpwd" {
        return false;
    }
    ["password", "passwd", "pwd", "secret", "token", "apikey"]
        .iter()
        .any(|word| plain.contains(word))
}

/// Whether `--name` is a flag whose value is a secret: its last word (split at `-`/`_`) is a
/// secret word, or it ends in `api-key`. `--no-*` switches take no value.
fn is_secret_flag(name: &str) -> bool {
    if name.starts_with("no-") || name.starts_with("no_") {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    let last = lower.rsplit(['-', '_']).next().unwrap_or("");
    matches!(
        last,
        "password" | "passwd" | "pwd" | "secret" | "token" | "apikey"
    ) || lower.ends_with("api-key")
        || lower.ends_with("api_key")
}

/// Programs whose `--password` is a switch (prompt for a password), not a flag with a value:
/// the libpq command-line tools.
fn password_is_a_switch(program: &str) -> bool {
    program.starts_with("psql")
        || program.starts_with("pg_")
        || program.starts_with("pgbench")
        || matches!(
            program,
            "createdb"
                | "createuser"
                | "dropdb"
                | "dropuser"
                | "clusterdb"
                | "reindexdb"
                | "vacuumdb"
        )
}

/// Replaces every credential in `args` (see the module documentation).
pub fn redact_credentials(args: &[String]) -> Vec<String> {
    let program = program_name(args);
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for (i, arg) in args.iter().enumerate() {
        if hide_next {
            out.push(REDACTED.to_owned());
            // A hidden value that is itself a secret flag (`--token --db-password X`): hide
            // what follows it too, whichever of the two the program takes as the flag.
            hide_next = arg
                .strip_prefix("--")
                .is_some_and(|name| !name.contains('=') && is_secret_flag(name));
            continue;
        }
        if i > 0
            && let Some(name) = arg.strip_prefix("--")
        {
            match name.split_once('=') {
                Some((flag, value)) if !value.is_empty() && is_secret_flag(flag) => {
                    out.push(format!("--{flag}={REDACTED}"));
                    continue;
                }
                None if is_secret_flag(name) => {
                    let switch =
                        name.eq_ignore_ascii_case("password") && password_is_a_switch(program);
                    hide_next = !switch;
                    out.push(arg.clone());
                    continue;
                }
                _ => {}
            }
        }
        out.push(redact_pairs(&redact_uri_passwords(arg)));
    }
    out
}

/// Characters of a URI scheme (RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`).
fn is_scheme_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

/// `scheme://user:PASSWORD@host` -> `scheme://user:<redacted>@host`, for every URI in `text`.
/// The authority ends at `/`, `?`, `#` or whitespace; the user information at its last `@`
/// (clients such as Python's urllib split there, so an unescaped `@` stays inside it).
fn redact_uri_passwords(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let sep = search + found;
        let authority_start = sep + 3;
        search = authority_start;
        let has_scheme = sep > 0 && bytes[sep - 1].is_ascii_alphanumeric() && {
            let start = bytes[..sep]
                .iter()
                .rposition(|&b| !is_scheme_char(b))
                .map_or(0, |p| p + 1);
            bytes[start].is_ascii_alphabetic()
        };
        if !has_scheme {
            continue;
        }
        let authority_end = bytes[authority_start..]
            .iter()
            .position(|&b| matches!(b, b'/' | b'?' | b'#') || b.is_ascii_whitespace())
            .map_or(bytes.len(), |p| authority_start + p);
        let authority = &text[authority_start..authority_end];
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let Some(colon) = authority[..at].find(':') else {
            continue;
        };
        if colon + 1 == at {
            continue; // `user:@host`: an empty password
        }
        out.push_str(&text[copied..authority_start + colon + 1]);
        out.push_str(REDACTED);
        copied = authority_start + at;
        search = authority_end;
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a `KEY=VALUE` pair's value ends, given what came before its key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PairContext {
    /// The key starts the argument: a lone `KEY=VALUE` argument's value is the rest of it,
    /// spaces included, unless more ` key=` pairs follow (a conninfo string).
    Argument,
    /// After whitespace: a conninfo pair, the value ends at whitespace.
    Conninfo,
    /// After `?` or `&`: a URI query parameter, the value ends at `&` or `#`.
    Query,
    /// After `;` (JDBC-style `;password=...;`), the value ends at `;`.
    Semicolon,
}

/// Redacts the values of the secret `KEY=VALUE` pairs in `arg` (see [`PairContext`]). A value
/// in single or double quotes ends at the matching quote (backslash escapes, as libpq reads
/// them).
fn redact_pairs(arg: &str) -> String {
    let bytes = arg.as_bytes();
    let mut out = String::with_capacity(arg.len());
    let mut copied = 0;
    let mut i = 0;
    // `-Dkey=value` (Java system properties) is a key at the start too.
    let first_key = if arg.starts_with("-D") { 2 } else { 0 };
    while i < bytes.len() {
        let context = if i == first_key {
            Some(PairContext::Argument)
        } else if i == 0 {
            None
        } else {
            match bytes[i - 1] {
                b if b.is_ascii_whitespace() => Some(PairContext::Conninfo),
                b'?' | b'&' => Some(PairContext::Query),
                b';' => Some(PairContext::Semicolon),
                _ => None,
            }
        };
        let Some(context) = context else {
            i += 1;
            continue;
        };
        let key_len = bytes[i..]
            .iter()
            .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            .count();
        if key_len == 0 || !bytes[i].is_ascii_alphabetic() && bytes[i] != b'_' {
            i += 1;
            continue;
        }
        let key = &arg[i..i + key_len];
        // libpq allows spaces around `=` in conninfo.
        let mut eq = i + key_len;
        if context == PairContext::Conninfo || context == PairContext::Argument {
            while eq < bytes.len() && bytes[eq] == b' ' {
                eq += 1;
            }
        }
        if bytes.get(eq) != Some(&b'=') {
            i += key_len.max(1);
            continue;
        }
        let mut value_start = eq + 1;
        if context == PairContext::Conninfo || context == PairContext::Argument {
            while value_start < bytes.len() && bytes[value_start] == b' ' {
                value_start += 1;
            }
        }
        let value_end = value_end(arg, value_start, context);
        if is_secret_key(key) && value_end > value_start {
            out.push_str(&arg[copied..value_start]);
            out.push_str(REDACTED);
            copied = value_end;
        }
        i = value_end.max(i + 1);
    }
    out.push_str(&arg[copied..]);
    out
}

/// The end of the value starting at `start` (see [`PairContext`] and [`redact_pairs`]).
fn value_end(arg: &str, start: usize, context: PairContext) -> usize {
    let bytes = arg.as_bytes();
    if let Some(&quote @ (b'\'' | b'"')) = bytes.get(start) {
        let mut j = start + 1;
        while j < bytes.len() {
            match bytes[j] {
                b'\\' => j += 2,
                b if b == quote => return j + 1,
                _ => j += 1,
            }
        }
        return bytes.len();
    }
    let ends_at = |stop: fn(u8) -> bool| {
        bytes[start..]
            .iter()
            .position(|&b| stop(b))
            .map_or(bytes.len(), |p| start + p)
    };
    match context {
        PairContext::Conninfo => ends_at(|b| b.is_ascii_whitespace()),
        PairContext::Query => ends_at(|b| matches!(b, b'&' | b'#') || b.is_ascii_whitespace()),
        PairContext::Semicolon => ends_at(|b| b == b';' || b.is_ascii_whitespace()),
        PairContext::Argument => {
            let word_end = ends_at(|b| b.is_ascii_whitespace());
            if followed_by_pair(&arg[word_end..]) {
                word_end
            } else {
                bytes.len()
            }
        }
    }
}

/// Whether `rest` (starting at whitespace) holds another conninfo ` key=` pair.
fn followed_by_pair(rest: &str) -> bool {
    rest.split_ascii_whitespace().any(|word| {
        word.split_once('=').is_some_and(|(key, _)| {
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        })
    })
}

#[cfg(test)]
mod tests;
