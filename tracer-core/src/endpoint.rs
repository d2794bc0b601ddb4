//! One end of a connection, typed: the daemon compares, hashes and labels endpoints without
//! formatting them to text and parsing the text back. Text is made only where it leaves the
//! daemon (events, labels, the live table) and read only where it comes back (the state
//! file).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

/// An IP socket address, a Unix socket path, or nothing (the unnamed client end of a Unix
/// socket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Endpoint {
    #[default]
    None,
    Inet(SocketAddr),
    Unix(String),
}

impl Endpoint {
    /// Reads back the text form ([`fmt::Display`]): `""` is none; an IP socket address is one
    /// (`ip:port`, `[v6]:port`); anything else is a Unix socket path.
    pub fn parse(text: &str) -> Self {
        if text.is_empty() {
            Self::None
        } else if let Ok(addr) = text.parse() {
            Self::Inet(addr)
        } else {
            Self::Unix(text.to_owned())
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Inet(addr) => Some(addr.ip()),
            _ => None,
        }
    }

    /// The text form without an allocation: what [`fmt::Display`] writes and event lines
    /// carry.
    pub fn text(&self) -> Text<'_> {
        match self {
            Self::None => Text::Str(""),
            Self::Unix(path) => Text::Str(path),
            Self::Inet(addr) => Text::Inet(InetText::new(addr)),
        }
    }
}

/// [`Endpoint::text`]: borrowed, or an IP socket address formatted on the stack.
pub enum Text<'a> {
    Str(&'a str),
    Inet(InetText),
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Self::Str(text) => text,
            Self::Inet(text) => text,
        }
    }
}

/// `ip:port`, `[v6]:port`, the socket path, or `""` for none: the form of events, labels and
/// the live table.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// An IP socket address formatted into a stack buffer (`[v6%scope]:port` fits in 64 bytes).
pub struct InetText {
    buf: [u8; 64],
    len: usize,
}

impl InetText {
    fn new(addr: &SocketAddr) -> Self {
        let mut text = Self {
            buf: [0; 64],
            len: 0,
        };
        match addr {
            // The common case by hand: `format_args!` costs more than the JSON around it.
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    text.push_decimal(u32::from(octet));
                }
                text.push(b':');
                text.push_decimal(u32::from(v4.port()));
            }
            SocketAddr::V6(_) => {
                if fmt::write(&mut text, format_args!("{addr}")).is_err() {
                    // Cannot happen: the longest form is 47 bytes.
                    text.len = 0;
                }
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn push_decimal(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            self.push(d);
        }
    }
}

impl fmt::Write for InetText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl std::ops::Deref for InetText {
    type Target = str;
    fn deref(&self) -> &str {
        // Only whole `&str`s were copied in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self::Inet(addr)
    }
}

/// [`Endpoint::parse`]; for tests and fixtures that write endpoints as text.
impl From<&str> for Endpoint {
    fn from(text: &str) -> Self {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        for text in [
            "",
            "127.0.0.1:5432",
            "[::1]:6432",
            "/run/postgresql/.s.PGSQL.5432",
        ] {
            assert_eq!(Endpoint::parse(text).to_string(), text);
        }
        assert_eq!(
            Endpoint::parse("[::1]:6432").ip(),
            Some("::1".parse().unwrap())
        );
        assert!(matches!(
            Endpoint::parse("/tmp/.s.PGSQL.5432"),
            Endpoint::Unix(_)
        ));
        assert_eq!(Endpoint::parse("/tmp/x").ip(), None);
        assert_eq!(Endpoint::parse(""), Endpoint::None);
    }

    #[test]
    fn stack_text_is_the_display_form() {
        for text in [
            "0.0.0.0:0",
            "127.0.0.1:5432",
            "255.255.255.255:65535",
            "10.20.30.40:6",
            "[::1]:6432",
            "[fe80::1%2]:5432",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(&*InetText::new(&addr), addr.to_string());
        }
    }
}
