//! The Unix-socket glob (`--unix-socket-glob`): compiled once, matched against every
//! socket path the daemon considers.

/// A compiled Unix-socket glob, fnmatch(3)-style without `FNM_PATHNAME`: `*` matches any run
/// of characters including `/` (so `*/.s.PGSQL.*` matches a socket in any directory), `?` one
/// character, `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]` one character of a class, `\x` the
/// character `x`. The whole path must match. Only socket paths are matched, so libpq's
/// `.s.PGSQL.5432.lock` (a regular file) never reaches the glob even though `*` would match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyOne,
    AnyRun,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    pub fn compile(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty glob".into());
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let token = match chars[i] {
                '*' => {
                    // `**` is the same as `*`.
                    if tokens.last() == Some(&Token::AnyRun) {
                        i += 1;
                        continue;
                    }
                    Token::AnyRun
                }
                '?' => Token::AnyOne,
                '\\' => {
                    i += 1;
                    match chars.get(i) {
                        Some(&c) => Token::Literal(c),
                        None => return Err("trailing '\\'".into()),
                    }
                }
                '[' => {
                    let (class, next) = compile_class(&chars, i)?;
                    i = next;
                    tokens.push(class);
                    continue;
                }
                c => Token::Literal(c),
            };
            tokens.push(token);
            i += 1;
        }
        Ok(Self { tokens })
    }

    pub fn matches(&self, path: &str) -> bool {
        let text: Vec<char> = path.chars().collect();
        let (mut t, mut p) = (0, 0);
        // Where the last `*` was and how much text it had taken when we came back to it.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(Token::AnyRun) => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                Some(token) if token.matches_one(text[t]) => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                // Let the last `*` take one more character and retry from there.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            }
        }
        self.tokens[p..].iter().all(|tok| *tok == Token::AnyRun)
    }
}

impl Token {
    fn matches_one(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyOne => true,
            Token::AnyRun => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// Compiles the class opening at `chars[open]` (`[`); returns it and the index after `]`.
fn compile_class(chars: &[char], open: usize) -> Result<(Token, usize), String> {
    let mut i = open + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err(format!("unclosed '[' at character {}", open + 1));
        };
        // A `]` right after `[` or `[!` is a member, as in fnmatch.
        if c == ']' && !first {
            return Ok((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *chars
                .get(i)
                .ok_or_else(|| format!("unclosed '[' at character {}", open + 1))?
        } else {
            c
        };
        i += 1;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']') {
            let hi = chars[i + 1];
            if hi < lo {
                return Err(format!("reversed range '{lo}-{hi}'"));
            }
            ranges.push((lo, hi));
            i += 2;
        } else {
            ranges.push((lo, lo));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The TOML file
