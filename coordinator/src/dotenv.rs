//! A Laravel `.env` file, read the way Laravel reads it (phpdotenv, then the
//! `env()` helper), and what Laravel's `REDIS_*` variables mean.
//!
//! Both binaries take `--env-file`; the node maps `REVERB_*` on top of this
//! (`belfry_node::config::laravel`). The process environment always wins over
//! the file, as in Laravel, whose dotenv repository is immutable.
//!
//! Covered: `KEY=value`, `export KEY=value`, `#` comments (whole lines, and
//! after whitespace in unquoted values), single quotes (literal), double
//! quotes (escapes, `${VAR}`, several lines), `${VAR}` in unquoted values,
//! and `env()`'s words: `null`, `true`, `false`, `empty`, and their
//! parenthesised forms. Not covered: phpdotenv's `${VAR:-default}`, which
//! Laravel does not document either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The variables of one `.env` file, in file order, after interpolation.
#[derive(Debug, Clone, Default)]
pub struct DotEnv {
    vars: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DotEnvError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// What Laravel's `env()` makes of a raw value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Null,
    Bool(bool),
    Text(String),
}

impl EnvValue {
    /// Laravel's `env()` conversions (case-insensitive, as Laravel's are).
    pub fn of(raw: &str) -> EnvValue {
        match raw.to_ascii_lowercase().as_str() {
            "null" | "(null)" => EnvValue::Null,
            "true" | "(true)" => EnvValue::Bool(true),
            "false" | "(false)" => EnvValue::Bool(false),
            "empty" | "(empty)" => EnvValue::Text(String::new()),
            _ => EnvValue::Text(raw.to_owned()),
        }
    }

    /// PHP truthiness of the value, which is how Reverb reads flags such as
    /// `scaling.enabled`: "0" and "" are false.
    pub fn is_truthy(&self) -> bool {
        match self {
            EnvValue::Null => false,
            EnvValue::Bool(b) => *b,
            EnvValue::Text(t) => !(t.is_empty() || t == "0"),
        }
    }

    /// The text, or `None` for `null` and empty values (Laravel's defaults
    /// then apply).
    pub fn text(self) -> Option<String> {
        match self {
            EnvValue::Text(t) if !t.is_empty() => Some(t),
            // PHP casts true to "1" and false to "".
            EnvValue::Bool(true) => Some("1".to_owned()),
            _ => None,
        }
    }
}

impl DotEnv {
    /// Reads the file at `path`; `process` as in `parse`.
    pub fn read(
        path: &Path,
        process: &dyn Fn(&str) -> Option<String>,
    ) -> Result<DotEnv, DotEnvError> {
        let text = std::fs::read_to_string(path).map_err(|source| DotEnvError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, process).map_err(|(line, message)| DotEnvError::Syntax {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses `text`; `process` is the process environment, which both wins
    /// over the file and is what `${VAR}` sees first. Errors carry the line.
    pub fn parse(
        text: &str,
        process: &dyn Fn(&str) -> Option<String>,
    ) -> Result<DotEnv, (usize, String)> {
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let start = i;
            let line = lines[i].trim_start_matches('\u{feff}').trim();
            i += 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line
                .strip_prefix("export")
                .filter(|r| r.starts_with([' ', '\t']))
                .map_or(line, str::trim_start);
            let Some((name, rest)) = line.split_once('=') else {
                return Err((start + 1, format!("expected NAME=value, found {line:?}")));
            };
            let name = name.trim_end();
            if !valid_name(name) {
                return Err((start + 1, format!("invalid variable name {name:?}")));
            }
            let rest = rest.trim_start();
            let lookup = |var: &str| -> Option<String> {
                process(var).or_else(|| seen.get(var).map(|&k| vars[k].1.clone()))
            };
            let value = if let Some(body) = rest.strip_prefix('\'') {
                let mut text = body.to_owned();
                loop {
                    if let Some(end) = text.find('\'') {
                        check_tail(&text[end + 1..]).map_err(|m| (start + 1, m))?;
                        text.truncate(end);
                        break text;
                    }
                    let Some(next) = lines.get(i) else {
                        return Err((start + 1, "unterminated single quote".into()));
                    };
                    text.push('\n');
                    text.push_str(next);
                    i += 1;
                }
            } else if let Some(body) = rest.strip_prefix('"') {
                let mut text = body.to_owned();
                loop {
                    if let Some(end) = closing_double_quote(&text) {
                        check_tail(&text[end + 1..]).map_err(|m| (start + 1, m))?;
                        text.truncate(end);
                        break interpolate(&unescape(&text), &lookup);
                    }
                    let Some(next) = lines.get(i) else {
                        return Err((start + 1, "unterminated double quote".into()));
                    };
                    text.push('\n');
                    text.push_str(next);
                    i += 1;
                }
            } else {
                let bare = match rest.find(" #").or_else(|| rest.find("\t#")) {
                    Some(at) => &rest[..at],
                    None if rest.starts_with('#') => "",
                    None => rest,
                };
                let bare = bare.trim_end();
                if bare.contains(char::is_whitespace) {
                    return Err((
                        start + 1,
                        format!("{name}: a value with spaces must be quoted"),
                    ));
                }
                interpolate(bare, &lookup)
            };
            match seen.get(name) {
                Some(&k) => vars[k].1 = value,
                None => {
                    seen.insert(name.to_owned(), vars.len());
                    vars.push((name.to_owned(), value));
                }
            }
        }
        Ok(DotEnv { vars })
    }

    /// The file's own value of `name`, raw (before `env()`'s conversions).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Names defined in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|(n, _)| n.as_str())
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// After a closing quote only whitespace and a comment may follow.
fn check_tail(tail: &str) -> Result<(), String> {
    let tail = tail.trim_start();
    if tail.is_empty() || tail.starts_with('#') {
        Ok(())
    } else {
        Err(format!("unexpected {tail:?} after the closing quote"))
    }
}

/// Index of the first `"` not escaped by a backslash.
fn closing_double_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(i),
            _ => escaped = false,
        }
    }
    None
}

/// phpdotenv's escapes in double quotes; an unknown escape stays as written.
/// `\$` becomes a placeholder so interpolation leaves it alone.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some('"') => out.push('"'),
            Some('\\') => out.push('\\'),
            Some('$') => out.push(LITERAL_DOLLAR),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Stands for an escaped `$` between unescaping and interpolation.
const LITERAL_DOLLAR: char = '\u{e000}';

/// Replaces `${NAME}` with its value (empty when unset), as phpdotenv does.
fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find('}') {
            Some(end) if valid_name(&after[..end]) => {
                out.push_str(&lookup(&after[..end]).unwrap_or_default());
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace(LITERAL_DOLLAR, "$")
}

/// A lookup that prefers the process environment and falls back to the file.
pub fn layered<'a>(
    process: &'a dyn Fn(&str) -> Option<String>,
    file: Option<&'a DotEnv>,
) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| process(name).or_else(|| file.and_then(|f| f.get(name).map(str::to_owned)))
}

/// Laravel's `Str::slug($title)` with the default `-` separator: `@`
/// becomes "at", whitespace, `_` and `-` a separator, other punctuation is
/// dropped, lower case, runs collapsed, ends trimmed. (Laravel transliterates
/// to ASCII first; an `APP_NAME` with accents should set `REDIS_PREFIX`.)
pub fn str_slug(title: &str) -> String {
    let title = title.replace('@', "-at-");
    let mut out = String::new();
    for c in title.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if (c.is_whitespace() || c == '-' || c == '_')
            && !out.is_empty()
            && !out.ends_with('-')
        {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

/// Laravel's Redis key prefix: `REDIS_PREFIX`, or the current skeleton's
/// default, `Str::slug(APP_NAME) . '-database-'` (APP_NAME defaulting to
/// "laravel"). Apps made from older skeletons (`..._database_`) set
/// `REDIS_PREFIX` or `laravel_redis_prefix` instead.
pub fn laravel_redis_prefix(env: &dyn Fn(&str) -> Option<String>) -> String {
    if let Some(prefix) = env("REDIS_PREFIX") {
        // Set, even to empty, it is used as it is (`null` means unset).
        if EnvValue::of(&prefix) != EnvValue::Null {
            return match EnvValue::of(&prefix) {
                EnvValue::Text(t) => t,
                _ => prefix,
            };
        }
    }
    let app = env("APP_NAME")
        .and_then(|v| EnvValue::of(&v).text())
        .unwrap_or_else(|| "laravel".into());
    format!("{}-database-", str_slug(&app))
}

/// The Redis URL Laravel's `default` connection (and Reverb's scaling
/// server) would use: `REDIS_URL` as it is, else one built from
/// `REDIS_HOST` (127.0.0.1), `REDIS_PORT` (6379), `REDIS_USERNAME`,
/// `REDIS_PASSWORD` and `REDIS_DB` (0). `None` when no `REDIS_*` is set.
pub fn laravel_redis_url(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let get = |name: &str| env(name).and_then(|v| EnvValue::of(&v).text());
    if let Some(url) = get("REDIS_URL") {
        return Some(url);
    }
    let names = [
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_USERNAME",
        "REDIS_PASSWORD",
        "REDIS_DB",
    ];
    if names.iter().all(|n| get(n).is_none()) {
        return None;
    }
    let host = get("REDIS_HOST").unwrap_or_else(|| "127.0.0.1".into());
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let port = get("REDIS_PORT").unwrap_or_else(|| "6379".into());
    let db = get("REDIS_DB").unwrap_or_else(|| "0".into());
    let auth = match (get("REDIS_USERNAME"), get("REDIS_PASSWORD")) {
        (None, None) => String::new(),
        (user, password) => format!(
            "{}:{}@",
            percent_encode(&user.unwrap_or_default()),
            percent_encode(&password.unwrap_or_default())
        ),
    };
    Some(format!("redis://{auth}{host}:{port}/{db}"))
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for
/// user names and passwords inside a URL.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> DotEnv {
        DotEnv::parse(text, &none).unwrap()
    }

    #[test]
    fn laravel_quoting_comments_and_export() {
        let env = parse(
            "# comment\n\
             APP_NAME=Laravel\n\
             export REVERB_APP_ID=123456\n\
             REVERB_APP_KEY=\"abc def\"  # trailing\n\
             REVERB_APP_SECRET='s#${NOT}'\n\
             REVERB_HOST=localhost # comment\n\
             HASH=a#b\n\
             EMPTY=\n\
             EMPTY_QUOTED=\"\"\n\
             SPACED = spaced\n",
        );
        assert_eq!(env.get("APP_NAME"), Some("Laravel"));
        assert_eq!(env.get("REVERB_APP_ID"), Some("123456"));
        assert_eq!(env.get("REVERB_APP_KEY"), Some("abc def"));
        assert_eq!(env.get("REVERB_APP_SECRET"), Some("s#${NOT}"));
        assert_eq!(env.get("REVERB_HOST"), Some("localhost"));
        assert_eq!(env.get("HASH"), Some("a#b"));
        assert_eq!(env.get("EMPTY"), Some(""));
        assert_eq!(env.get("EMPTY_QUOTED"), Some(""));
        assert_eq!(env.get("SPACED"), Some("spaced"));
    }

    #[test]
    fn interpolation_sees_earlier_lines_and_the_process_first() {
        let process = |n: &str| (n == "FROM_PROCESS").then(|| "p".to_owned());
        let env = DotEnv::parse(
            "APP_NAME=Belfry\n\
             VITE_APP_NAME=\"${APP_NAME}\"\n\
             BARE=${APP_NAME}-x\n\
             MISSING=\"[${NOPE}]\"\n\
             P=${FROM_PROCESS}\n\
             ESCAPED=\"\\${APP_NAME} \\\"q\\\"\\n\"\n\
             MULTI=\"one\ntwo\"\n\
             AFTER=ok\n",
            &process,
        )
        .unwrap();
        assert_eq!(env.get("VITE_APP_NAME"), Some("Belfry"));
        assert_eq!(env.get("BARE"), Some("Belfry-x"));
        assert_eq!(env.get("MISSING"), Some("[]"));
        assert_eq!(env.get("P"), Some("p"));
        assert_eq!(env.get("ESCAPED"), Some("${APP_NAME} \"q\"\n"));
        assert_eq!(env.get("MULTI"), Some("one\ntwo"));
        assert_eq!(env.get("AFTER"), Some("ok"));
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (text, line) in [
            ("A=1\nnot a pair\n", 2),
            ("A=two words\n", 1),
            ("A=\"open\nB=2\n", 1),
            ("1A=x\n", 1),
            ("A='x' y\n", 1),
        ] {
            let (at, message) = DotEnv::parse(text, &none).unwrap_err();
            assert_eq!(at, line, "{text:?}: {message}");
        }
    }

    #[test]
    fn process_environment_wins_over_the_file() {
        let file = parse("REDIS_HOST=file\nREDIS_PORT=7000\n");
        let process = |n: &str| (n == "REDIS_HOST").then(|| "proc".to_owned());
        let env = layered(&process, Some(&file));
        assert_eq!(env("REDIS_HOST").as_deref(), Some("proc"));
        assert_eq!(env("REDIS_PORT").as_deref(), Some("7000"));
        assert_eq!(env("REDIS_DB"), None);
    }

    #[test]
    fn env_helper_words() {
        assert_eq!(EnvValue::of("null"), EnvValue::Null);
        assert_eq!(EnvValue::of("(NULL)"), EnvValue::Null);
        assert!(EnvValue::of("true").is_truthy());
        assert!(EnvValue::of("1").is_truthy());
        assert!(!EnvValue::of("false").is_truthy());
        assert!(!EnvValue::of("0").is_truthy());
        assert!(!EnvValue::of("").is_truthy());
        assert_eq!(EnvValue::of("(empty)").text(), None);
    }

    #[test]
    fn redis_url_from_laravel_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(laravel_redis_url(&none), None);
        assert_eq!(
            laravel_redis_url(&env(&[
                ("REDIS_HOST", "127.0.0.1"),
                ("REDIS_PASSWORD", "null")
            ])),
            Some("redis://127.0.0.1:6379/0".into())
        );
        assert_eq!(
            laravel_redis_url(&env(&[
                ("REDIS_HOST", "redis.internal"),
                ("REDIS_PORT", "6380"),
                ("REDIS_USERNAME", "app"),
                ("REDIS_PASSWORD", "p@ss:w/rd"),
                ("REDIS_DB", "2"),
            ])),
            Some("redis://app:p%40ss%3Aw%2Frd@redis.internal:6380/2".into())
        );
        assert_eq!(
            laravel_redis_url(&env(&[("REDIS_URL", "redis://r:1/3"), ("REDIS_HOST", "x")])),
            Some("redis://r:1/3".into())
        );
    }

    #[test]
    fn laravel_prefix_defaults_from_app_name() {
        assert_eq!(laravel_redis_prefix(&none), "laravel-database-");
        let named = |n: &str| (n == "APP_NAME").then(|| "My Shop @ Home!".to_owned());
        assert_eq!(laravel_redis_prefix(&named), "my-shop-at-home-database-");
        let set = |n: &str| (n == "REDIS_PREFIX").then(|| "shop_".to_owned());
        assert_eq!(laravel_redis_prefix(&set), "shop_");
        assert_eq!(str_slug("Laravel"), "laravel");
        assert_eq!(str_slug("  a__b  "), "a-b");
        assert_eq!(str_slug("Acme Inc."), "acme-inc");
    }
}
