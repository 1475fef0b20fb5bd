//! `switchyard import-nginx`: convert the nginx configuration teams run in front of their
//! blue/green containers into a switchyard config.
//!
//! The subset converted is what those files hold (README, "From nginx to switchyard"):
//! `upstream` blocks (`server` lines, `weight=`, `max_fails`/`fail_timeout`, `least_conn`,
//! `keepalive`), `server` blocks (`listen`, `server_name`, `ssl_certificate(_key)`, a
//! `return 301 https://...` redirect), prefix `location`s with `proxy_pass` (a trailing `/` in
//! it, or `rewrite ^/p/(.*) /$1 break;`, strips the prefix), `location ~* ... { return 403; }`
//! and `deny all;` (the deny list), the `proxy_set_header` lines switchyard sends anyway,
//! `proxy_connect_timeout`/`proxy_read_timeout`, `keepalive_timeout`, `client_max_body_size`,
//! `worker_processes`, `access_log off`, and `include` (globs too) with `set $var` to find which
//! color a blue/green file selects.
//!
//! Blue/green: upstreams whose names differ only by a color word (`app_blue`, `app_green`)
//! become one upstream (`app`) with a pool per color, `active` being the one `proxy_pass`
//! points at (directly, through an included file, or through `set $backend app_green;`).
//! Servers inside one upstream named by color (`server app_green:8080 weight=5;`) become pools
//! as well.
//!
//! Everything else is listed as a [`Note`] with its file and line: directives not converted,
//! and conversions that behave differently (a 301 that becomes 308). Nothing is dropped
//! silently except directives switchyard does anyway (`proxy_http_version 1.1`, `keepalive 32`,
//! `proxy_set_header X-Real-IP $remote_addr`, ...).
//!
//! Routing follows nginx's choice: within a server the longest prefix wins (routes are sorted
//! longest first, because switchyard takes the first match), servers with exact names come
//! before wildcard names, and the default server's locations become routes without `host`
//! (nginx sends unknown hosts to it).

use crate::raw;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The result of an import: the config and what could not be converted as it was.
#[derive(Debug, Clone)]
pub struct Import {
    /// The converted config (validate it with [`crate::validate`]).
    pub config: raw::Config,
    /// Every directive not converted, or converted with a difference, in file order.
    pub notes: Vec<Note>,
}

/// One directive the import could not convert (or converted with a difference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The file it is in (an included file, or the main one).
    pub file: PathBuf,
    /// Its line (1-based).
    pub line: usize,
    /// The directive as written (`gzip on`).
    pub directive: String,
    /// Whether it was left out, or converted with a difference.
    pub kind: NoteKind,
    /// Why, and what to do instead.
    pub reason: String,
}

/// See [`Note::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// Not in the output.
    NotConverted,
    /// In the output, but switchyard behaves differently.
    Changed,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            NoteKind::NotConverted => "not converted",
            NoteKind::Changed => "converted with a difference",
        };
        write!(
            f,
            "{}:{}: `{}`: {what}: {}",
            self.file.display(),
            self.line,
            self.directive,
            self.reason
        )
    }
}

/// Why an nginx file could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The main file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A syntax error (unbalanced braces, an unterminated string, a directive without `;`).
    #[error("{}:{line}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Import the nginx configuration at `path`; `include`s are read relative to its directory.
pub fn import_file(path: &Path) -> Result<Import, ImportError> {
    // nginx files are bytes; a Latin-1 comment must not stop the import.
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    // Absolute, so relative certificate paths work from wherever the YAML is used.
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = std::path::absolute(&base).unwrap_or(base);
    import_str(&text, path, &base)
}

/// Import nginx configuration text; `name` is used in notes and errors, relative `include`s are
/// read from `base`.
pub fn import_str(text: &str, name: &Path, base: &Path) -> Result<Import, ImportError> {
    let mut parser = Parser {
        base: base.to_path_buf(),
        notes: Vec::new(),
        depth: 0,
        files: 0,
        blocks: 0,
    };
    let tree = parser.parse(text, name)?;
    let mut c = Converter {
        notes: parser.notes,
        base: base.to_path_buf(),
        ..Converter::default()
    };
    c.walk_main(&tree);
    Ok(c.finish())
}

/// Render an import as YAML: a header saying where it came from, then the config.
pub fn to_yaml(import: &Import, source: &Path) -> String {
    let mut out = format!(
        "# switchyard config converted from {} by `switchyard import-nginx`.\n\
         # Check it with `switchyard check -c FILE`; every nginx directive that was not converted\n\
         # (or converted with a difference) was printed with its line by the import.\n",
        source.display()
    );
    let value = match serde_yaml::to_value(&import.config) {
        Ok(v) => strip_nulls(v),
        Err(e) => return format!("{out}# cannot render: {e}\n"),
    };
    match serde_yaml::to_string(&value) {
        Ok(y) => out.push_str(&y),
        Err(e) => out.push_str(&format!("# cannot render: {e}\n")),
    }
    out
}

fn strip_nulls(v: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(strip_nulls).collect()),
        v => v,
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing: nginx's syntax into a tree of directives, includes expanded.

/// One directive: `name args...;` or `name args... { block }`.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Option<Vec<Directive>>,
    file: std::rc::Rc<PathBuf>,
    line: usize,
}

impl Directive {
    fn text(&self) -> String {
        let mut s = self.name.clone();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(char::is_whitespace) {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// How deep includes may nest (a file including itself stops here, with a note).
const MAX_INCLUDE_DEPTH: usize = 16;
/// How many files includes may read in all (a glob matching itself would otherwise multiply).
const MAX_INCLUDED_FILES: usize = 256;
/// How deep blocks may nest (nginx's real files nest 4 or 5 deep).
const MAX_BLOCK_DEPTH: usize = 64;

struct Parser {
    base: PathBuf,
    notes: Vec<Note>,
    depth: usize,
    files: usize,
    blocks: usize,
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Semicolon,
    Open,
    Close,
}

fn tokenize(text: &str, file: &Path) -> Result<Vec<(Token, usize)>, ImportError> {
    let syntax = |line: usize, message: &str| ImportError::Syntax {
        file: file.to_path_buf(),
        line,
        message: message.to_string(),
    };
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while let Some(&c) = chars.peek() {
                    if c == '\n' {
                        break;
                    }
                    chars.next();
                }
            }
            ';' => {
                out.push((Token::Semicolon, line));
                chars.next();
            }
            '{' => {
                out.push((Token::Open, line));
                chars.next();
            }
            '}' => {
                out.push((Token::Close, line));
                chars.next();
            }
            '"' | '\'' => {
                let quote = c;
                let start = line;
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err(syntax(start, "unterminated string")),
                        Some('\\') => match chars.next() {
                            Some(e) if e == quote || e == '\\' => word.push(e),
                            Some('n') => word.push('\n'),
                            Some('t') => word.push('\t'),
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                            None => return Err(syntax(start, "unterminated string")),
                        },
                        Some(c) if c == quote => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            word.push(c);
                        }
                    }
                }
                out.push((Token::Word(word), start));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == ';' || c == '{' || c == '}' {
                        // `${var}` keeps its braces.
                        if c == '{' && word.ends_with('$') {
                            word.push(c);
                            chars.next();
                            continue;
                        }
                        if c == '}' && word.contains("${") && !word.ends_with('}') {
                            word.push(c);
                            chars.next();
                            continue;
                        }
                        break;
                    }
                    if c == '\\' {
                        chars.next();
                        if let Some(e) = chars.next() {
                            word.push('\\');
                            word.push(e);
                        }
                        continue;
                    }
                    word.push(c);
                    chars.next();
                }
                out.push((Token::Word(word), line));
            }
        }
    }
    Ok(out)
}

impl Parser {
    fn parse(&mut self, text: &str, file: &Path) -> Result<Vec<Directive>, ImportError> {
        let tokens = tokenize(text, file)?;
        let file_rc = std::rc::Rc::new(file.to_path_buf());
        let mut pos = 0;
        let tree = self.block(&tokens, &mut pos, &file_rc, None)?;
        Ok(tree)
    }

    /// Directives up to the matching `}` (or the end of the file at the top).
    fn block(
        &mut self,
        tokens: &[(Token, usize)],
        pos: &mut usize,
        file: &std::rc::Rc<PathBuf>,
        opened_at: Option<usize>,
    ) -> Result<Vec<Directive>, ImportError> {
        let syntax = |line: usize, message: String| ImportError::Syntax {
            file: file.to_path_buf(),
            line,
            message,
        };
        let mut out = Vec::new();
        loop {
            let Some((tok, line)) = tokens.get(*pos) else {
                return match opened_at {
                    None => Ok(out),
                    Some(l) => Err(syntax(l, "the block opened here is never closed".into())),
                };
            };
            *pos += 1;
            let name = match tok {
                Token::Close => {
                    return match opened_at {
                        Some(_) => Ok(out),
                        None => Err(syntax(*line, "unexpected \"}\"".into())),
                    }
                }
                Token::Semicolon => continue,
                Token::Open => return Err(syntax(*line, "unexpected \"{\"".into())),
                Token::Word(w) => w.clone(),
            };
            let mut args = Vec::new();
            let block = loop {
                match tokens.get(*pos) {
                    None => {
                        return Err(syntax(
                            *line,
                            format!("directive \"{name}\" is not terminated by \";\""),
                        ))
                    }
                    Some((Token::Word(w), _)) => {
                        args.push(w.clone());
                        *pos += 1;
                    }
                    Some((Token::Semicolon, _)) => {
                        *pos += 1;
                        break None;
                    }
                    Some((Token::Open, l)) => {
                        let l = *l;
                        *pos += 1;
                        if self.blocks >= MAX_BLOCK_DEPTH {
                            return Err(syntax(l, "blocks nested too deep".into()));
                        }
                        self.blocks += 1;
                        let inner = self.block(tokens, pos, file, Some(l));
                        self.blocks -= 1;
                        break Some(inner?);
                    }
                    Some((Token::Close, _)) => {
                        return Err(syntax(
                            *line,
                            format!("directive \"{name}\" is not terminated by \";\""),
                        ))
                    }
                }
            };
            let d = Directive {
                name,
                args,
                block,
                file: file.clone(),
                line: *line,
            };
            if d.name == "include" && d.block.is_none() {
                out.extend(self.include(&d)?);
            } else {
                out.push(d);
            }
        }
    }

    /// The directives of the files an `include` names (a glob in the file name is expanded,
    /// in name order, as nginx does).
    fn include(&mut self, d: &Directive) -> Result<Vec<Directive>, ImportError> {
        let Some(pattern) = d.args.first() else {
            self.note(d, NoteKind::NotConverted, "include without a file");
            return Ok(Vec::new());
        };
        if self.depth >= MAX_INCLUDE_DEPTH {
            self.note(
                d,
                NoteKind::NotConverted,
                "includes nested too deep (does a file include itself?)",
            );
            return Ok(Vec::new());
        }
        let path = Path::new(pattern);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        };
        let files = match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if name.contains('*') || name.contains('?') => {
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| e.path())
                            .filter(|p| {
                                p.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| glob_match(name, n))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                found.sort();
                found
            }
            _ => vec![path],
        };
        let mut out = Vec::new();
        for f in files {
            if self.files >= MAX_INCLUDED_FILES {
                self.note(
                    d,
                    NoteKind::NotConverted,
                    "more than 256 included files: the rest is not read",
                );
                break;
            }
            self.files += 1;
            match std::fs::read(&f).map(|b| String::from_utf8_lossy(&b).into_owned()) {
                Ok(text) => {
                    self.depth += 1;
                    let parsed = self.parse(&text, &f);
                    self.depth -= 1;
                    out.extend(parsed?);
                }
                Err(e) => self.note(
                    d,
                    NoteKind::NotConverted,
                    &format!("cannot read {}: {e}", f.display()),
                ),
            }
        }
        Ok(out)
    }

    fn note(&mut self, d: &Directive, kind: NoteKind, reason: &str) {
        self.notes.push(Note {
            file: d.file.to_path_buf(),
            line: d.line,
            directive: d.text(),
            kind,
            reason: reason.to_string(),
        });
    }
}

/// `*` and `?` in a file name.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Conversion.

const COLORS: [&str; 3] = ["blue", "green", "canary"];

/// An nginx `upstream` block.
#[derive(Debug, Clone, Default)]
struct NginxUpstream {
    servers: Vec<Server>,
    least_conn: bool,
    idle_timeout: Option<String>,
}

#[derive(Debug, Clone)]
struct Server {
    addr: String,
    weight: u32,
    max_fails: Option<u32>,
    fail_timeout: Option<String>,
}

/// Settings inherited from `http` to `server` to `location`.
#[derive(Debug, Clone, Default)]
struct Scope {
    /// A `proxy_set_header Host ...` is in effect (else nginx sends the upstream's name).
    host_set: bool,
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
    vars: BTreeMap<String, String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Scope {
    /// `set $name value;` (two arguments).
    fn set(&mut self, d: &Directive) {
        if let [name, value] = d.args.as_slice() {
            self.vars
                .insert(name.trim_start_matches('$').to_string(), value.clone());
        }
    }
}

/// A `server` block, converted.
#[derive(Debug, Clone, Default)]
struct VServer {
    /// addr, ssl, default_server, the directive
    listens: Vec<(String, bool, bool, Directive)>,
    names: Vec<String>,
    cert: Option<String>,
    key: Option<String>,
    redirect: Option<Directive>,
    /// (prefix, target, strip, directive)
    routes: Vec<(String, Target, bool, Directive)>,
}

/// Where a `proxy_pass` goes: an nginx upstream block by name, or a host:port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Block(String),
    Direct(String),
}

/// A location's effective `proxy_connect_timeout` and `proxy_read_timeout`, and its `proxy_pass`.
type LocationTimeouts = (Option<String>, Option<String>, Directive);

#[derive(Default)]
struct Converter {
    notes: Vec<Note>,
    base: PathBuf,
    upstreams: BTreeMap<String, (NginxUpstream, Directive)>,
    servers: Vec<VServer>,
    threads: Option<usize>,
    keepalive_timeout: Option<String>,
    body_sizes: Vec<(u64, String, Directive)>,
    access_log_off: bool,
    request_id: Option<String>,
    deny_status: Option<u16>,
    deny_paths: Vec<String>,
    /// Per target: (connect, read) timeouts of the locations proxying to it.
    timeouts: BTreeMap<String, Vec<LocationTimeouts>>,
}

impl Converter {
    fn note(&mut self, d: &Directive, kind: NoteKind, reason: impl Into<String>) {
        self.notes.push(Note {
            file: d.file.to_path_buf(),
            line: d.line,
            directive: d.text(),
            kind,
            reason: reason.into(),
        });
    }

    /// A file path as nginx reads it: relative ones from the configuration's directory, so
    /// the converted file works from wherever it is put.
    fn path(&self, p: &str) -> String {
        if Path::new(p).is_absolute() || self.base.as_os_str().is_empty() {
            p.to_string()
        } else {
            self.base.join(p).display().to_string()
        }
    }

    fn skip(&mut self, d: &Directive, reason: impl Into<String>) {
        self.note(d, NoteKind::NotConverted, reason)
    }

    /// The main context (and `http`, which holds the same things here): a file that is only
    /// `upstream` and `server` blocks (a conf.d snippet) is read the same way.
    fn walk_main(&mut self, tree: &[Directive]) {
        let mut scope = Scope::default();
        // Upstreams and variables first: a `server` may come before the upstream it uses.
        self.collect_upstreams(tree);
        for d in tree {
            self.main_directive(d, &mut scope);
        }
    }

    fn collect_upstreams(&mut self, tree: &[Directive]) {
        for d in tree {
            match (d.name.as_str(), &d.block) {
                ("http", Some(b)) => self.collect_upstreams(b),
                ("upstream", Some(b)) => {
                    let Some(name) = d.args.first() else {
                        self.skip(d, "upstream without a name");
                        continue;
                    };
                    let up = self.upstream_block(b);
                    self.upstreams.insert(name.clone(), (up, d.clone()));
                }
                _ => {}
            }
        }
    }

    fn main_directive(&mut self, d: &Directive, scope: &mut Scope) {
        match (d.name.as_str(), &d.block) {
            ("http", Some(b)) => {
                let mut inner = scope.clone();
                for d in b {
                    self.main_directive(d, &mut inner);
                }
            }
            ("upstream", Some(_)) => {} // collected first
            ("server", Some(b)) => {
                let s = self.server_block(b, scope.clone());
                self.servers.push(s);
            }
            ("events", Some(_)) => self.skip(
                d,
                "connection limits are `max_connections` (default 10000 per process)",
            ),
            ("worker_processes", None) => match d.args.first().map(String::as_str) {
                Some("auto") => {}
                Some(n) => match n.parse::<usize>() {
                    Ok(n) if (1..=1024).contains(&n) => self.threads = Some(n),
                    _ => self.skip(d, "not a number of workers"),
                },
                None => self.skip(d, "no value"),
            },
            ("user" | "pid" | "error_log" | "worker_rlimit_nofile", None) => self.skip(
                d,
                "a process setting: run switchyard under systemd (docs/switchyard.service) or its image",
            ),
            _ => self.common(d, scope),
        }
    }

    /// Directives allowed in http, server and location alike.
    fn common(&mut self, d: &Directive, scope: &mut Scope) {
        let first = d.args.first().cloned().unwrap_or_default();
        match d.name.as_str() {
            "proxy_connect_timeout" => match nginx_time(&first) {
                Some(t) => scope.connect_timeout = Some(t),
                None => self.skip(d, "not an nginx time"),
            },
            "proxy_read_timeout" => match nginx_time(&first) {
                Some(t) => scope.read_timeout = Some(t),
                None => self.skip(d, "not an nginx time"),
            },
            "proxy_send_timeout" => self.skip(
                d,
                "switchyard's read_timeout bounds each write to the upstream as well",
            ),
            "keepalive_timeout" => match nginx_time(&first) {
                Some(t) => {
                    if let Some(prev) = &self.keepalive_timeout {
                        if *prev != t {
                            self.note(d, NoteKind::Changed, format!("one keepalive_timeout for every listener in switchyard; {prev} kept"));
                            return;
                        }
                    }
                    self.keepalive_timeout = Some(t);
                }
                None => self.skip(d, "not an nginx time"),
            },
            "client_max_body_size" => match nginx_size(&first) {
                Some(n) => self.body_sizes.push((n, first.to_ascii_lowercase(), d.clone())),
                None => self.skip(d, "not an nginx size"),
            },
            "set" if d.args.len() == 2 => scope.set(d),
            "ssl_certificate" => scope.cert = Some(self.path(&first)),
            "ssl_certificate_key" => scope.key = Some(self.path(&first)),
            "ssl_protocols" | "ssl_ciphers" | "ssl_prefer_server_ciphers" | "ssl_session_cache"
            | "ssl_session_timeout" | "ssl_session_tickets" | "ssl_dhparam" | "ssl_ecdh_curve"
            | "ssl_stapling" | "ssl_stapling_verify" | "ssl_trusted_certificate" => self.skip(
                d,
                "switchyard's TLS (rustls) offers TLS 1.2 and 1.3 with its own safe cipher suites; not configurable",
            ),
            "http2" if first == "on" => {} // h2 is on by default on TLS listeners
            "proxy_http_version" if first == "1.1" => {}
            "proxy_http_version" => self.skip(d, "switchyard talks HTTP/1.1 with keep-alive to upstreams"),
            "proxy_set_header" => {
                if first.eq_ignore_ascii_case("Host") {
                    scope.host_set = true;
                }
                self.proxy_set_header(d)
            }
            "proxy_buffering" | "proxy_buffers" | "proxy_buffer_size" | "proxy_busy_buffers_size"
            | "proxy_request_buffering" | "proxy_max_temp_file_size" => self.skip(
                d,
                "switchyard streams bodies in both directions (64 KiB per connection at most in flight)",
            ),
            "proxy_next_upstream" | "proxy_next_upstream_tries" | "proxy_next_upstream_timeout" => {
                self.skip(d, "use `retries` on the upstream (connect failures, and idempotent requests that failed before any response byte)")
            }
            "access_log" if first == "off" => self.access_log_off = true,
            "access_log" => self.skip(
                d,
                "switchyard writes its access log (`combined` + its own fields) to stdout by default; set `access_log: PATH` to write a file",
            ),
            "log_format" => self.skip(d, "the access log formats are `combined` (with switchyard's fields appended) and `json`"),
            "gzip" | "gzip_types" | "gzip_min_length" | "gzip_comp_level" | "gzip_proxied"
            | "gzip_vary" | "gzip_disable" => self.skip(d, "switchyard does not compress responses (let the app do it)"),
            "add_header" => self.skip(d, "switchyard does not add response headers (except the request id)"),
            "resolver" | "resolver_timeout" => self.skip(
                d,
                "switchyard resolves names with the system resolver, off the request path, every `resolve_interval` (5s)",
            ),
            "allow" | "deny" => self.skip(d, "no client address rules in switchyard; use a firewall"),
            "if" => self.skip(d, "no `if` in switchyard"),
            "map" | "split_clients" => self.skip(
                d,
                "canary splitting is built in: `proxyctl weight green 5`, `canary.sticky: cookie | header:NAME`, `X-Canary: true`",
            ),
            "limit_req" | "limit_req_zone" | "limit_conn" | "limit_conn_zone" => {
                self.skip(d, "no rate limiting in switchyard yet")
            }
            "sendfile" | "tcp_nopush" | "tcp_nodelay" | "types_hash_max_size" | "server_tokens"
            | "default_type" | "types" | "charset" | "server_names_hash_bucket_size"
            | "client_body_buffer_size" | "large_client_header_buffers" => {
                self.skip(d, "no switchyard equivalent needed")
            }
            "client_header_timeout" | "client_body_timeout" | "send_timeout" => self.skip(
                d,
                "switchyard's `client_header_timeout` (default 10s) bounds the whole head; bodies and responses must progress within 60s",
            ),
            _ => self.skip(d, "no switchyard equivalent"),
        }
    }

    fn proxy_set_header(&mut self, d: &Directive) {
        let (Some(name), value) = (d.args.first(), d.args.get(1).map(String::as_str)) else {
            self.skip(d, "no header name");
            return;
        };
        let value = value.unwrap_or("");
        let same = |a: &str| name.eq_ignore_ascii_case(a);
        // What switchyard sends anyway: keep-alive to upstreams and WebSocket upgrades too.
        let built_in = (same("Host") && matches!(value, "$host" | "$http_host"))
            || (same("X-Real-IP") && value == "$remote_addr")
            || (same("X-Forwarded-For") && value == "$proxy_add_x_forwarded_for")
            || (same("X-Forwarded-Proto") && matches!(value, "$scheme" | "https" | "http"))
            || (same("X-Forwarded-Host")
                && matches!(value, "$host" | "$http_host" | "$server_name"))
            || (same("Connection") && matches!(value, "" | "upgrade" | "$connection_upgrade"))
            || (same("Upgrade") && value == "$http_upgrade");
        if built_in {
        } else if same("X-Forwarded-For") && value == "$remote_addr" {
            self.note(
                d,
                NoteKind::Changed,
                "switchyard appends the client's address to the X-Forwarded-For it sent",
            );
        } else if value == "$request_id" {
            self.request_id = Some(name.clone());
        } else {
            self.skip(
                d,
                "switchyard sends Host (the client's), X-Real-IP, X-Forwarded-For/-Proto/-Host and the request id; no other headers",
            );
        }
    }

    fn upstream_block(&mut self, block: &[Directive]) -> NginxUpstream {
        let mut up = NginxUpstream::default();
        for d in block {
            match d.name.as_str() {
                "server" => {
                    let Some(addr) = d.args.first() else {
                        self.skip(d, "server without an address");
                        continue;
                    };
                    if addr.starts_with("unix:") {
                        self.skip(d, "Unix socket upstreams are not supported");
                        continue;
                    }
                    let mut s = Server {
                        addr: with_port(addr),
                        weight: 1,
                        max_fails: None,
                        fail_timeout: None,
                    };
                    let mut keep = true;
                    for p in &d.args[1..] {
                        if let Some(w) = p.strip_prefix("weight=") {
                            match w.parse() {
                                Ok(w) => s.weight = w,
                                Err(_) => self.skip(d, "weight is not a number"),
                            }
                        } else if let Some(m) = p.strip_prefix("max_fails=") {
                            s.max_fails = m.parse().ok();
                        } else if let Some(t) = p.strip_prefix("fail_timeout=") {
                            s.fail_timeout = nginx_time(t);
                        } else if p == "down" {
                            self.skip(d, "a server marked down is left out; add it back with `proxyctl pool add`");
                            keep = false;
                        } else if p == "backup" {
                            self.skip(d, "no backup servers in switchyard: a pool's instances all take traffic");
                            keep = false;
                        } else {
                            self.note(d, NoteKind::Changed, format!("parameter {p} is ignored"));
                        }
                    }
                    if keep {
                        up.servers.push(s);
                    }
                }
                "keepalive" => {} // always on
                "keepalive_timeout" => match d.args.first().and_then(|t| nginx_time(t)) {
                    Some(t) => up.idle_timeout = Some(t),
                    None => self.skip(d, "not an nginx time"),
                },
                "least_conn" => up.least_conn = true,
                "keepalive_requests" => self.skip(
                    d,
                    "upstream connections are reused until idle_timeout or the app closes them",
                ),
                "ip_hash" | "hash" | "sticky" => self.skip(
                    d,
                    "no client affinity across instances; canary stickiness is `canary.sticky`",
                ),
                "zone" => {}
                _ => self.skip(d, "no switchyard equivalent in an upstream"),
            }
        }
        up
    }

    fn server_block(&mut self, block: &[Directive], mut scope: Scope) -> VServer {
        let mut s = VServer::default();
        // Variables and certificates first: nginx's `set` and `ssl_certificate` apply to the
        // whole server wherever they are written.
        for d in block {
            match d.name.as_str() {
                "set" if d.args.len() == 2 => scope.set(d),
                "ssl_certificate" => scope.cert = d.args.first().map(|p| self.path(p)),
                "ssl_certificate_key" => scope.key = d.args.first().map(|p| self.path(p)),
                _ => {}
            }
        }
        let mut locations = Vec::new();
        for d in block {
            match (d.name.as_str(), &d.block) {
                ("listen", None) => self.listen(d, &mut s),
                ("server_name", None) => {
                    for n in &d.args {
                        if n == "_" || n.is_empty() || n == "localhost" {
                            continue;
                        }
                        if n.starts_with('~') {
                            self.skip(d, format!("regex server name {n}: only exact names and *.example.com"));
                            continue;
                        }
                        // nginx's `.example.com` is example.com and its subdomains.
                        if let Some(rest) = n.strip_prefix('.') {
                            s.names.push(rest.to_string());
                            s.names.push(format!("*.{rest}"));
                        } else {
                            s.names.push(n.to_ascii_lowercase());
                        }
                    }
                }
                ("location", Some(_)) => locations.push(d.clone()),
                ("return", None) => {
                    let code = d.args.first().map(String::as_str).unwrap_or("");
                    let url = d.args.get(1).map(String::as_str).unwrap_or("");
                    if matches!(code, "301" | "302" | "307" | "308") && url.starts_with("https://") && url.ends_with("$request_uri") {
                        s.redirect = Some(d.clone());
                    } else {
                        self.skip(d, "only `return 301 https://$host$request_uri` (the redirect to https) is converted at server level");
                    }
                }
                ("set" | "ssl_certificate" | "ssl_certificate_key", None) => {}
                ("rewrite", None) => self.skip(d, "rewrites outside a location: only `rewrite ^/p/(.*) /$1 break;` in `location /p/` is converted"),
                _ => self.common(d, &mut scope),
            }
        }
        s.cert = scope.cert.clone();
        s.key = scope.key.clone();
        for l in &locations {
            self.location(l, &scope, &mut s);
        }
        s
    }

    fn listen(&mut self, d: &Directive, s: &mut VServer) {
        let Some(a) = d.args.first() else {
            self.skip(d, "listen without an address");
            return;
        };
        if a.starts_with("unix:") {
            self.skip(d, "Unix socket listeners are not supported");
            return;
        }
        let addr = if let Ok(port) = a.parse::<u16>() {
            format!("0.0.0.0:{port}")
        } else if let Some(port) = a.strip_prefix("*:") {
            format!("0.0.0.0:{port}")
        } else if let Some(rest) = a.strip_prefix("localhost:") {
            format!("127.0.0.1:{rest}")
        } else if a.contains(':') {
            a.clone()
        } else {
            // An address without a port: nginx listens on 80.
            format!("{a}:80")
        };
        let mut ssl = false;
        let mut default = false;
        for p in &d.args[1..] {
            match p.as_str() {
                "ssl" => ssl = true,
                "http2" => {}
                "default_server" | "default" => default = true,
                "proxy_protocol" => self.skip(d, "the PROXY protocol is not supported"),
                _ => {}
            }
        }
        s.listens.push((addr, ssl, default, d.clone()));
    }

    fn location(&mut self, d: &Directive, scope: &Scope, s: &mut VServer) {
        let (modifier, path) = match d.args.as_slice() {
            // nginx also takes the modifier written against the path: `~*\.php$`, `=/x`.
            [p] => ["^~", "~*", "~", "=", "@"]
                .iter()
                .find_map(|m| p.strip_prefix(m).map(|rest| (*m, rest)))
                .unwrap_or(("", p.as_str())),
            [m, p] => (m.as_str(), p.as_str()),
            _ => {
                self.skip(d, "location without a path");
                return;
            }
        };
        if modifier == "@" {
            self.skip(
                d,
                "named locations (error pages, internal redirects) are not converted",
            );
            return;
        }
        let Some(block) = &d.block else { return };
        let mut scope = scope.clone();
        let mut proxy: Option<&Directive> = None;
        let mut rewrite: Option<&Directive> = None;
        let mut deny: Option<(u16, &Directive)> = None;
        for inner in block {
            match (inner.name.as_str(), &inner.block) {
                ("proxy_pass", None) => proxy = Some(inner),
                ("rewrite", None) => rewrite = Some(inner),
                ("return", None) => match inner.args.first().and_then(|c| c.parse::<u16>().ok()) {
                    Some(code) if (400..=599).contains(&code) => deny = Some((code, inner)),
                    _ => self.skip(
                        inner,
                        "only `return 4xx/5xx` (the deny list) is converted in a location",
                    ),
                },
                ("deny", None)
                    if inner.args.first().map(String::as_str) == Some("all")
                        && !block
                            .iter()
                            .any(|b| b.name == "allow" || b.name == "proxy_pass") =>
                {
                    deny = Some((403, inner))
                }
                ("location", Some(_)) => self.skip(
                    inner,
                    "nested locations are not converted: write them as routes",
                ),
                _ => self.common(inner, &mut scope),
            }
        }
        if let Some((status, r)) = deny {
            let regex = match modifier {
                "~" => path.to_string(),
                "~*" => format!("(?i){path}"),
                "=" => format!("^{}$", regex_escape(path)),
                "" | "^~" => format!("^{}", regex_escape(path)),
                _ => {
                    self.skip(d, format!("location modifier {modifier}"));
                    return;
                }
            };
            if let Some(prev) = self.deny_status {
                if prev != status {
                    self.note(
                        r,
                        NoteKind::Changed,
                        format!("one deny status in switchyard: answered {prev}"),
                    );
                }
            } else {
                self.deny_status = Some(status);
            }
            if !self.deny_paths.contains(&regex) {
                self.deny_paths.push(regex);
            }
            return;
        }
        let Some(p) = proxy else {
            if !block.is_empty() {
                self.skip(d, "a location that neither proxies nor denies (static files, redirects) is not converted");
            }
            return;
        };
        if !matches!(modifier, "" | "^~") {
            self.skip(
                d,
                "only prefix locations become routes (regex and exact locations are not converted)",
            );
            return;
        }
        let Some(url) = p.args.first() else {
            self.skip(p, "proxy_pass without a URL");
            return;
        };
        let url = expand_vars(url, &scope.vars);
        let Some(rest) = url.strip_prefix("http://") else {
            self.skip(
                p,
                "only http:// upstreams are supported (TLS to the app is not)",
            );
            return;
        };
        let (hostport, uri) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        if hostport.contains('$') || uri.is_some_and(|u| u.contains('$') && u != "$request_uri") {
            self.skip(p, "a variable whose value is not known here (set it with `set $name value;` in the server, or name the upstream)");
            return;
        }
        let mut strip = false;
        match uri {
            None | Some("$request_uri") => {}
            Some(u) if u == path => {}
            Some("/") if path.ends_with('/') => strip = true,
            Some(_) => {
                self.skip(p, "a URI in proxy_pass replaces the location's prefix; switchyard can only strip it (`proxy_pass http://app/;` in `location /p/`)");
                return;
            }
        }
        if let Some(r) = rewrite {
            if strip_rewrite(r, path) {
                if strip {
                    self.skip(r, "the prefix is already stripped by proxy_pass");
                }
                strip = true;
            } else {
                self.skip(r, "only `rewrite ^/p/(.*) /$1 break;` in `location /p/` is converted (as strip_prefix)");
            }
        }
        if !scope.host_set {
            self.note(p, NoteKind::Changed, format!("without `proxy_set_header Host`, nginx sent `Host: {hostport}`; switchyard sends the client's Host"));
        }
        let target = if self.upstreams.contains_key(hostport) {
            Target::Block(hostport.to_string())
        } else {
            Target::Direct(with_port(hostport))
        };
        self.timeouts.entry(target_key(&target)).or_default().push((
            scope.connect_timeout.clone(),
            scope.read_timeout.clone(),
            p.clone(),
        ));
        s.routes.push((path.to_string(), target, strip, p.clone()));
    }

    fn finish(mut self) -> Import {
        let mut config = raw::Config::default();
        // Upstreams: group nginx upstream blocks by name without their color word.
        let mut names: BTreeMap<String, String> = BTreeMap::new(); // target key -> upstream
        let mut pools: BTreeMap<String, BTreeMap<String, Vec<(String, u32)>>> = BTreeMap::new();
        let mut settings: BTreeMap<String, NginxUpstream> = BTreeMap::new();
        let blocks = std::mem::take(&mut self.upstreams);
        for (name, (up, d)) in &blocks {
            let (base, color) = split_color(name);
            let mut base = sanitize(&base);
            // Two nginx names that only sanitize alike (`my.app`, `my_app`) stay apart; the
            // colors of one app (`app_blue`, `app_green`) share theirs on purpose.
            while names
                .iter()
                .any(|(k, v)| *v == base && split_color(k).0 != split_color(name).0)
            {
                base.push('_');
            }
            names.insert(name.clone(), base.clone());
            let entry = pools.entry(base.clone()).or_default();
            match color {
                Some(c) => {
                    entry
                        .entry(c)
                        .or_default()
                        .extend(up.servers.iter().map(|s| (s.addr.clone(), s.weight)));
                }
                None => {
                    // Servers named by color inside one upstream become pools.
                    for s in &up.servers {
                        let host = s.addr.rsplit_once(':').map_or(s.addr.as_str(), |(h, _)| h);
                        let pool = split_color(host).1.unwrap_or_else(|| "main".to_string());
                        entry
                            .entry(pool)
                            .or_default()
                            .push((s.addr.clone(), s.weight));
                    }
                }
            }
            if up.servers.is_empty() {
                self.skip(d, "an upstream without servers is left out");
            }
            let set = settings.entry(base).or_default();
            set.least_conn |= up.least_conn;
            if up.idle_timeout.is_some() {
                set.idle_timeout = up.idle_timeout.clone();
            }
            set.servers.extend(up.servers.iter().cloned());
        }
        for s in &self.servers {
            for (_, t, _, _) in &s.routes {
                if let Target::Direct(addr) = t {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                    let (base, color) = split_color(host);
                    // A colored host (`app_green:8080`) joins its app's pools; any other
                    // address is its own upstream, named by host and port, so two backends
                    // (`localhost:3000`, `localhost:4000`) never share a pool.
                    let base = match &color {
                        Some(_) if !base.is_empty() => sanitize(&base),
                        _ => {
                            let mut n = sanitize(addr);
                            while blocks.contains_key(&n)
                                || names.iter().any(|(k, v)| *v == n && *k != target_key(t))
                            {
                                n.push_str("_direct");
                            }
                            n
                        }
                    };
                    names.insert(target_key(t), base.clone());
                    let pool = color.unwrap_or_else(|| "main".to_string());
                    let list = pools.entry(base).or_default().entry(pool).or_default();
                    if !list.iter().any(|(a, _)| a == addr) {
                        list.push((addr.clone(), 1));
                    }
                }
            }
        }
        // Which pool each upstream's locations select.
        let mut selected: BTreeMap<String, Vec<(String, Directive)>> = BTreeMap::new();
        for s in &self.servers {
            for (_, t, _, d) in &s.routes {
                let key = target_key(t);
                let Some(up) = names.get(&key) else { continue };
                let color = match t {
                    Target::Block(n) => split_color(n).1,
                    Target::Direct(a) => {
                        split_color(a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h)).1
                    }
                };
                if let Some(c) = color {
                    selected.entry(up.clone()).or_default().push((c, d.clone()));
                }
            }
        }
        for (up, pools_of) in &pools {
            let mut u = raw::Upstream::default();
            for (pool, servers) in pools_of {
                u.pools.insert(
                    pool.clone(),
                    servers.iter().map(|(a, _)| a.clone()).collect(),
                );
            }
            if pools_of.len() > 1 {
                let origin = blocks
                    .iter()
                    .find(|(n, _)| names.get(*n) == Some(up))
                    .map(|(_, (_, d))| d);
                u.active = Some(self.active_pool(up, pools_of, selected.get(up), origin));
            }
            if let Some(set) = settings.get(up) {
                if set.least_conn {
                    u.balance = Some("least_requests".into());
                }
                u.idle_timeout = set.idle_timeout.clone();
                if let Some(s) = set.servers.iter().find(|s| s.max_fails.is_some()) {
                    u.passive = Some(raw::Passive {
                        consecutive_failures: s.max_fails,
                        eject_for: s.fail_timeout.clone().or_else(|| Some("10s".into())),
                    });
                }
            }
            // Timeouts of the locations that proxy to this upstream.
            let mut connect: Option<(String, Directive)> = None;
            let mut read: Option<(String, Directive)> = None;
            let keys: Vec<String> = names
                .iter()
                .filter(|(_, v)| *v == up)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                for (c, r, d) in self.timeouts.get(&k).cloned().unwrap_or_default() {
                    for (val, slot, what) in [
                        (c, &mut connect, "proxy_connect_timeout"),
                        (r, &mut read, "proxy_read_timeout"),
                    ] {
                        // Unset is nginx's default, 60s: a location without it differs from
                        // one with 5s.
                        let v = val.unwrap_or_else(|| "1m".to_string());
                        match slot {
                            Some((prev, _)) if *prev != v => self.notes.push(Note {
                                file: d.file.to_path_buf(),
                                line: d.line,
                                directive: d.text(),
                                kind: NoteKind::Changed,
                                reason: format!("{what} differs between locations of upstream {up}; one value per upstream in switchyard: {prev} kept"),
                            }),
                            Some(_) => {}
                            None => *slot = Some((v, d.clone())),
                        }
                    }
                }
            }
            // Only when some location set one (else switchyard's defaults: connect 2s, read 60s).
            let set = |pick: fn(&LocationTimeouts) -> bool| {
                names
                    .iter()
                    .filter(|(_, v)| *v == up)
                    .filter_map(|(k, _)| self.timeouts.get(k))
                    .flatten()
                    .any(pick)
            };
            if set(|t| t.0.is_some()) {
                u.connect_timeout = connect.map(|(v, _)| v);
            }
            if set(|t| t.1.is_some()) {
                u.read_timeout = read.map(|(v, _)| v);
            }
            let origin = blocks
                .iter()
                .find(|(n, _)| names.get(*n) == Some(up))
                .map(|(_, (_, d))| d.clone())
                .or_else(|| {
                    self.timeouts
                        .iter()
                        .find(|(k, _)| names.get(*k) == Some(up))
                        .and_then(|(_, v)| v.first().map(|t| t.2.clone()))
                });
            if let Some(d) = origin {
                self.note(&d, NoteKind::Changed, format!("upstream {up}: switchyard checks every instance with GET /actuator/health expecting {{\"status\":\"UP\"}} (Spring Boot) and gates switches on it; for another app set upstreams.{up}.health.path (and expect_json_status: [])"));
            }
            config.upstreams.insert(up.clone(), u);
        }
        // Listeners, one per address; TLS certificates of the servers sharing one by SNI.
        let mut listens: Vec<raw::Listen> = Vec::new();
        let mut certs: BTreeMap<String, Vec<raw::CertFiles>> = BTreeMap::new();
        let servers = std::mem::take(&mut self.servers);
        for s in &servers {
            for (addr, ssl, _, ld) in &s.listens {
                if addr.starts_with("[::]:") {
                    let v4 = addr.replacen("[::]", "0.0.0.0", 1);
                    if servers.iter().flat_map(|s| &s.listens).any(|l| l.0 == v4) {
                        // nginx binds `[::]` IPv6-only; a wildcard IPv6 socket next to
                        // 0.0.0.0 on the same port may fail to bind in switchyard.
                        self.skip(ld, format!("{addr} next to {v4}: listen on {v4} only, or add an IPv6 listener after checking the host binds it IPv6-only"));
                        continue;
                    }
                }
                if *ssl {
                    match (&s.cert, &s.key) {
                        (Some(cert), Some(key)) => {
                            let list = certs.entry(addr.clone()).or_default();
                            if !list.iter().any(|c| c.cert == *cert) {
                                list.push(raw::CertFiles { cert: cert.clone(), key: key.clone() });
                            }
                        }
                        _ => self.skip(
                            ld,
                            "ssl without ssl_certificate and ssl_certificate_key: served without TLS",
                        ),
                    }
                }
                let redirect = s.redirect.is_some() && s.routes.is_empty() && !*ssl;
                match listens.iter_mut().find(|l| l.addr == *addr) {
                    Some(l) => {
                        if l.redirect_https == Some(true) && !redirect && !s.routes.is_empty() {
                            l.redirect_https = None;
                        }
                    }
                    None => listens.push(raw::Listen {
                        addr: addr.clone(),
                        tls: None,
                        http2: None,
                        redirect_https: redirect.then_some(true),
                    }),
                }
            }
            if let Some(r) = &s.redirect {
                if s.routes.is_empty() {
                    let code = r.args.first().map(String::as_str).unwrap_or("");
                    if code != "308" {
                        self.note(r, NoteKind::Changed, "switchyard redirects to https with 308 (the method and body are kept), not ".to_string() + code);
                    }
                } else {
                    self.skip(
                        r,
                        "a server that both redirects and proxies: the redirect is not converted",
                    );
                }
            }
        }
        for l in &mut listens {
            if let Some(list) = certs.remove(&l.addr) {
                l.tls = Some(if list.len() == 1 {
                    raw::Tls {
                        cert: Some(list[0].cert.clone()),
                        key: Some(list[0].key.clone()),
                        certs: None,
                    }
                } else {
                    raw::Tls {
                        cert: None,
                        key: None,
                        certs: Some(list),
                    }
                });
            }
        }
        if listens.is_empty() {
            listens.push(raw::Listen {
                addr: "0.0.0.0:80".into(),
                ..raw::Listen::default()
            });
        }
        config.listen = listens;
        // Routes: exact names, then wildcards, then the default server without a host.
        // nginx's default server of each listen address: the one marked default_server there,
        // else the first listening there. Its locations become host-less routes. A default
        // server that proxies nothing (`return 444`) leaves none: unknown hosts get 404.
        let mut defaults = std::collections::BTreeSet::new();
        let norm = |a: &str| a.replacen("[::]:", "0.0.0.0:", 1);
        let all_addrs: std::collections::BTreeSet<String> = servers
            .iter()
            .flat_map(|s| s.listens.iter().map(|l| norm(&l.0)))
            .collect();
        for addr in &all_addrs {
            let on = |s: &VServer| s.listens.iter().any(|l| norm(&l.0) == *addr);
            let flagged = servers
                .iter()
                .position(|s| s.listens.iter().any(|l| norm(&l.0) == *addr && l.2));
            if let Some(i) = flagged.or_else(|| servers.iter().position(on)) {
                defaults.insert(i);
            }
        }
        // Routes are not per listener in switchyard: say so when nginx had them on different
        // addresses.
        let mut first_addrs: Option<Vec<String>> = None;
        for s in servers.iter().filter(|s| !s.routes.is_empty()) {
            // `[::]:80` next to `0.0.0.0:80` is the same port to switchyard.
            let mut addrs: Vec<String> = s
                .listens
                .iter()
                .map(|l| l.0.replacen("[::]:", "0.0.0.0:", 1))
                .collect();
            addrs.sort();
            addrs.dedup();
            match &first_addrs {
                None => first_addrs = Some(addrs),
                Some(f) if *f != addrs => {
                    if let Some(l) = s.listens.first() {
                        let d = l.3.clone();
                        self.note(&d, NoteKind::Changed, format!("switchyard's routes answer on every listener; nginx served this server's locations on {} only", addrs.join(", ")));
                    }
                }
                Some(_) => {}
            }
        }
        let mut exact = Vec::new();
        let mut wild = Vec::new();
        let mut hostless = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            let mut routes: Vec<&(String, Target, bool, Directive)> = s.routes.iter().collect();
            // nginx: the longest matching prefix wins; switchyard: the first match.
            routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
            let hosts: Vec<Option<String>> = if defaults.contains(&i) || s.names.is_empty() {
                vec![None]
            } else {
                s.names.iter().cloned().map(Some).collect()
            };
            for h in hosts {
                for (prefix, t, strip, d) in &routes {
                    let Some(up) = names.get(&target_key(t)) else {
                        continue;
                    };
                    let r = (
                        raw::Route {
                            host: h.clone(),
                            path_prefix: prefix.clone(),
                            upstream: up.clone(),
                            strip_prefix: strip.then_some(true),
                        },
                        d.clone(),
                    );
                    match &h {
                        None => hostless.push(r),
                        Some(h) if h.starts_with("*.") => wild.push(r),
                        Some(_) => exact.push(r),
                    }
                }
            }
        }
        // More specific wildcards first (`*.api.example.com` before `*.example.com`), and the
        // host-less routes of several servers by prefix length; both sorts keep file order
        // otherwise.
        wild.sort_by_key(|(r, _)| {
            std::cmp::Reverse(r.host.as_deref().map_or(0, |h| h.matches('.').count()))
        });
        hostless.sort_by_key(|(r, _)| std::cmp::Reverse(r.path_prefix.len()));
        let mut routes: Vec<raw::Route> = Vec::new();
        for (r, d) in exact.into_iter().chain(wild).chain(hostless) {
            match routes
                .iter()
                .find(|x| x.host == r.host && x.path_prefix == r.path_prefix)
            {
                Some(x) if *x == r => {}
                Some(x) => {
                    let why = format!(
                        "another server already routes {}{} to {}",
                        r.host.as_deref().unwrap_or(""),
                        r.path_prefix,
                        x.upstream
                    );
                    self.skip(&d, why);
                }
                None => routes.push(r),
            }
        }
        config.routes = routes;
        if !self.deny_paths.is_empty() {
            config.deny = Some(raw::Deny {
                status: self.deny_status.filter(|s| *s != 403),
                paths: std::mem::take(&mut self.deny_paths),
            });
        }
        config.threads = self.threads;
        config.keepalive_timeout = self.keepalive_timeout.take();
        // nginx's 0 is "no limit": it wins over any number.
        match self
            .body_sizes
            .iter()
            .max_by_key(|b| if b.0 == 0 { u64::MAX } else { b.0 })
        {
            Some((_, text, _)) => {
                let text = text.clone();
                let largest = self
                    .body_sizes
                    .iter()
                    .map(|b| if b.0 == 0 { u64::MAX } else { b.0 })
                    .max()
                    .map(|m| if m == u64::MAX { 0 } else { m });
                let others: Vec<Directive> = self
                    .body_sizes
                    .iter()
                    .filter(|b| Some(b.0) != largest)
                    .map(|b| b.2.clone())
                    .collect();
                for d in others {
                    self.note(&d, NoteKind::Changed, format!("one client_max_body_size for all requests in switchyard: the largest, {text}"));
                }
                config.client_max_body_size = Some(raw::Size::Text(text));
            }
            // nginx's default is 1m; switchyard's 10m. Keep what the app saw behind nginx.
            None => config.client_max_body_size = Some(raw::Size::Text("1m".into())),
        }
        if self.access_log_off {
            config.access_log = Some("off".into());
        }
        config.request_id = self.request_id.take();
        let mut notes = self.notes;
        notes.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        notes.dedup();
        Import { config, notes }
    }

    /// The pool the nginx file sends traffic to: the color `proxy_pass` selects, else the
    /// heaviest by `weight=`, else blue.
    fn active_pool(
        &mut self,
        up: &str,
        pools: &BTreeMap<String, Vec<(String, u32)>>,
        selected: Option<&Vec<(String, Directive)>>,
        origin: Option<&Directive>,
    ) -> String {
        if let Some(sel) = selected {
            let first = sel[0].0.clone();
            for (c, d) in sel.iter().skip(1) {
                if *c != first {
                    self.note(d, NoteKind::Changed, format!("locations send upstream {up} to different colors; {first} is active for all"));
                }
            }
            return first;
        }
        let weight = |p: &str| {
            pools
                .get(p)
                .map_or(0, |s| s.iter().map(|(_, w)| u64::from(*w)).sum::<u64>())
        };
        let total: u64 = pools.keys().map(|p| weight(p)).sum();
        let heaviest = pools
            .keys()
            .max_by_key(|p| weight(p))
            .cloned()
            .unwrap_or_default();
        if pools.len() > 1 && pools.keys().any(|p| weight(p) != weight(&heaviest)) {
            let split: Vec<String> = pools
                .keys()
                .map(|p| format!("{p}={}", weight(p) * 100 / total.max(1)))
                .collect();
            if let Some(d) = origin {
                self.note(d, NoteKind::Changed, format!("weights are state, not config, in switchyard: {heaviest} starts at 100%; run `proxyctl weights {}` after start (or `proxyctl canary`)", split.join(" ")));
            }
            return heaviest;
        }
        let active = if pools.contains_key("blue") {
            "blue".to_string()
        } else {
            heaviest
        };
        if pools.len() > 1 {
            if let Some(d) = origin {
                let names: Vec<&str> = pools.keys().map(String::as_str).collect();
                self.note(d, NoteKind::Changed, format!("no location names one color of {up} ({}): nginx spread requests over them; {active} starts at 100%: check `active`", names.join(", ")));
            }
        }
        active
    }
}

fn target_key(t: &Target) -> String {
    match t {
        Target::Block(n) => n.clone(),
        Target::Direct(a) => format!("direct:{a}"),
    }
}

/// `app_blue` -> ("app", Some("blue")); `blue` -> ("blue", Some("blue")); `app` -> ("app", None).
fn split_color(name: &str) -> (String, Option<String>) {
    let lower = name.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split(['_', '-', '.']).collect();
    let colors: Vec<&&str> = parts.iter().filter(|p| COLORS.contains(p)).collect();
    if colors.len() != 1 || parts.len() == 1 {
        return (
            name.to_string(),
            if parts.len() == 1 && colors.len() == 1 {
                Some(lower)
            } else {
                None
            },
        );
    }
    let color = colors[0].to_string();
    let rest: Vec<&str> = parts.iter().filter(|p| **p != color).copied().collect();
    (rest.join("_"), Some(color))
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "app".into()
    } else {
        s
    }
}

fn with_port(addr: &str) -> String {
    if addr.starts_with('[') {
        if addr.contains("]:") {
            addr.to_string()
        } else {
            format!("{addr}:80")
        }
    } else if addr.contains(':') {
        addr.to_string()
    } else {
        format!("{addr}:80")
    }
}

/// `$name` / `${name}` replaced by `set` values; unknown ones are left as they are.
fn expand_vars(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(j) => (&inner[..j], j + 2),
                None => ("", 0),
            }
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..n], n)
        };
        match vars.get(name) {
            Some(v) if !name.is_empty() => out.push_str(v),
            _ => {
                out.push('$');
                out.push_str(&after[..len]);
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Whether `rewrite RE REPL break;` strips `prefix`: `^/p/(.*) /$1`, `^/p/(.*)$ /$1`,
/// `^/p(/.*)$ $1`.
fn strip_rewrite(d: &Directive, prefix: &str) -> bool {
    let (Some(re), Some(repl)) = (d.args.first(), d.args.get(1)) else {
        return false;
    };
    if !matches!(d.args.get(2).map(String::as_str), Some("break")) {
        return false;
    }
    let Some(re) = re.strip_prefix('^') else {
        return false;
    };
    let re = re.strip_suffix('$').unwrap_or(re);
    let unescape = |s: &str| {
        s.replace("\\/", "/")
            .replace("\\.", ".")
            .replace("\\-", "-")
    };
    let with_slash = prefix.trim_end_matches('/').to_string() + "/";
    if let Some(lit) = re.strip_suffix("(.*)") {
        return repl == "/$1" && unescape(lit) == with_slash;
    }
    if let Some(lit) = re.strip_suffix("(/.*)") {
        return repl == "$1" && unescape(lit) + "/" == with_slash;
    }
    false
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// nginx times: `60` (seconds), `60s`, `500ms`, `5m`, `1h`, `1d`, `1m30s`.
fn nginx_time(s: &str) -> Option<String> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let value: u64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms: u64 = match unit {
            "ms" => 1,
            "" | "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return None,
        };
        total = total.checked_add(Duration::from_millis(value.checked_mul(ms)?))?;
    }
    Some(humantime::format_duration(total).to_string())
}

/// nginx sizes: bytes, `k`/`K`, `m`/`M`, `g`/`G`.
fn nginx_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes() {
        assert_eq!(nginx_time("60").as_deref(), Some("1m"));
        assert_eq!(nginx_time("75s").as_deref(), Some("1m 15s"));
        assert_eq!(nginx_time("500ms").as_deref(), Some("500ms"));
        assert_eq!(nginx_time("1m30s").as_deref(), Some("1m 30s"));
        assert_eq!(nginx_time("2h").as_deref(), Some("2h"));
        assert_eq!(nginx_time("5x"), None);
        assert_eq!(nginx_time("s"), None);
        assert_eq!(nginx_time("99999999999999999999"), None);
        assert_eq!(nginx_size("10m"), Some(10 << 20));
        assert_eq!(nginx_size("512K"), Some(512 << 10));
        assert_eq!(nginx_size("0"), Some(0));
        assert_eq!(nginx_size("18446744073709551615g"), None);
        assert_eq!(nginx_size("ten"), None);
    }

    #[test]
    fn colors_split_off_names() {
        assert_eq!(split_color("app_blue"), ("app".into(), Some("blue".into())));
        assert_eq!(
            split_color("spring-app-green"),
            ("spring_app".into(), Some("green".into()))
        );
        assert_eq!(split_color("green"), ("green".into(), Some("green".into())));
        assert_eq!(split_color("backend"), ("backend".into(), None));
        assert_eq!(split_color("blue_green"), ("blue_green".into(), None));
    }

    #[test]
    fn rewrites_that_strip_the_prefix() {
        let d = |args: &[&str]| Directive {
            name: "rewrite".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            block: None,
            file: std::rc::Rc::new(PathBuf::from("x")),
            line: 1,
        };
        assert!(strip_rewrite(
            &d(&["^/backend/(.*)", "/$1", "break"]),
            "/backend/"
        ));
        assert!(strip_rewrite(
            &d(&["^/backend/(.*)$", "/$1", "break"]),
            "/backend"
        ));
        assert!(strip_rewrite(
            &d(&["^/backend(/.*)$", "$1", "break"]),
            "/backend/"
        ));
        assert!(strip_rewrite(
            &d(&["^\\/api\\/(.*)", "/$1", "break"]),
            "/api/"
        ));
        assert!(!strip_rewrite(
            &d(&["^/backend/(.*)", "/v2/$1", "break"]),
            "/backend/"
        ));
        assert!(!strip_rewrite(
            &d(&["^/other/(.*)", "/$1", "break"]),
            "/backend/"
        ));
        assert!(!strip_rewrite(
            &d(&["^/backend/(.*)", "/$1", "last"]),
            "/backend/"
        ));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        for (text, line, what) in [
            ("http {\n  server {\n", 2, "never closed"),
            ("events {}\n}\n", 2, "unexpected"),
            ("worker_processes 2\n", 1, "not terminated"),
            ("server { listen \"80; }", 1, "unterminated string"),
        ] {
            let e = import_str(text, Path::new("n.conf"), Path::new("."))
                .expect_err(text)
                .to_string();
            assert!(
                e.starts_with(&format!("n.conf:{line}: ")) && e.contains(what),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn variables_expand() {
        let vars: BTreeMap<String, String> =
            [("backend".to_string(), "app_green".to_string())].into();
        assert_eq!(expand_vars("http://$backend", &vars), "http://app_green");
        assert_eq!(
            expand_vars("http://${backend}/", &vars),
            "http://app_green/"
        );
        assert_eq!(
            expand_vars("http://$other$request_uri", &vars),
            "http://$other$request_uri"
        );
    }
}
