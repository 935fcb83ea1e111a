//! One line of a `courier send` file: JSON Lines parsed into a message, and a reader
//! that bounds every line it keeps.
//!
//! ```text
//! bytes ──LineReader (≤ max bytes kept; longer lines skipped, numbered)──> line
//!       ──parse_line (fields as JSON values, then checked one by one)──> OutgoingMessage
//!                                                                     └─ or LineProblem
//! ```
//!
//! Invariant: a [`LineProblem`] says what is wrong and where, never what the line holds
//! (no recipient, no payload; serde's own messages, which quote values, are not used).

use std::io::BufRead;

use base64::Engine as _;
use bytes::Bytes;
use courier_pipeline::wire::{self, Recipient, Welcome};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::OutgoingMessage;

/// The size bounds a line is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Largest payload.
    pub payload_bytes_max: u32,
    /// Largest SUBMIT body: one message with its batch header must fit.
    pub frame_bytes_max: u32,
}

impl Bounds {
    /// The widest bounds any valid profile allows (`limits.payload_bytes_max` at most
    /// [`wire::PAYLOAD_BYTES_LIMIT`], `limits.frame_bytes_max` at most
    /// [`wire::FRAME_BYTES_LIMIT`]): a line outside them is bad for every server.
    pub const WIDEST: Bounds = Bounds {
        payload_bytes_max: wire::PAYLOAD_BYTES_LIMIT,
        frame_bytes_max: wire::FRAME_BYTES_LIMIT,
    };

    /// The bounds a server stated in WELCOME.
    pub fn of(welcome: &Welcome) -> Bounds {
        Bounds {
            payload_bytes_max: welcome.payload_bytes_max,
            frame_bytes_max: welcome.frame_bytes_max,
        }
    }
}

/// SUBMIT body bytes of `m` alone in a batch.
pub(crate) fn message_alone_bytes(m: &OutgoingMessage) -> usize {
    wire::BATCH_HEADER_BYTES + message_bytes(m)
}

/// Bytes `m` adds to a SUBMIT body.
pub(crate) fn message_bytes(m: &OutgoingMessage) -> usize {
    wire::MESSAGE_OVERHEAD_BYTES + m.recipient.as_bytes().len() + m.payload.len()
}

/// What is wrong with one line. Never carries the line's content: no number, no payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    /// Longer than [`super::LINE_BYTES_MAX`].
    #[error("the line is longer than {max} bytes")]
    TooLong {
        /// The bound.
        max: usize,
    },
    /// Not JSON (or not UTF-8, or trailing characters after the object).
    #[error("invalid JSON at column {column}")]
    InvalidJson {
        /// Where the parser stopped, 1-based.
        column: usize,
    },
    /// The JSON ends before the object does.
    #[error("the JSON object is cut short")]
    Truncated,
    /// Valid JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A field other than `recipient`, `payload`, `payload_b64`, `id`. Its name is shown
    /// only when it looks like a field name (letters and `_`), so that a stray number or
    /// text used as a key is not echoed.
    #[error(
        "unknown field {} (allowed: recipient, payload, payload_b64, id)",
        .0.as_deref().map_or("(name not shown)".to_string(), |n| format!("`{n}`"))
    )]
    UnknownField(Option<String>),
    /// A field given twice.
    #[error("field `{0}` appears twice")]
    DuplicateField(&'static str),
    /// No `recipient`.
    #[error("no `recipient`")]
    MissingRecipient,
    /// `recipient` is not a string.
    #[error("`recipient` is not a string")]
    RecipientNotString,
    /// `recipient` is not E.164.
    #[error("`recipient` is not an E.164 number (`+` then 7 to 15 digits, the first not 0)")]
    InvalidRecipient,
    /// Neither `payload` nor `payload_b64`.
    #[error("no payload: give `payload` (UTF-8 text) or `payload_b64` (base64)")]
    NoPayload,
    /// Both `payload` and `payload_b64`.
    #[error("both `payload` and `payload_b64`: give exactly one")]
    BothPayloads,
    /// `payload` or `payload_b64` is not a string.
    #[error("`{0}` is not a string")]
    PayloadNotString(&'static str),
    /// `payload_b64` does not decode.
    #[error("`payload_b64` is not valid base64 (standard alphabet, padding optional)")]
    InvalidBase64,
    /// A payload of zero bytes (the server rejects those).
    #[error("the payload is empty")]
    EmptyPayload,
    /// A payload over the bound.
    #[error("the payload is {bytes} bytes, over the limit of {max}")]
    PayloadTooLarge {
        /// Payload bytes.
        bytes: usize,
        /// The bound.
        max: u32,
    },
    /// The message does not fit a SUBMIT frame even alone.
    #[error("the message takes {bytes} bytes in a SUBMIT, over the frame limit of {max}")]
    MessageTooLarge {
        /// SUBMIT body bytes of the message alone.
        bytes: usize,
        /// The bound.
        max: u32,
    },
    /// `id` is not an unsigned 64-bit integer.
    #[error("`id` is not an integer in 0..=18446744073709551615")]
    BadId,
    /// The same id as an earlier line (explicit, or that line's number by default).
    #[error("id {id} is already used on line {first_line}")]
    DuplicateId {
        /// The id.
        id: u64,
        /// The first line using it.
        first_line: u64,
    },
    /// The file holds more than [`super::MESSAGES_MAX`] messages.
    #[error("more than {max} messages in one file; split the file")]
    TooManyMessages {
        /// The bound.
        max: u64,
    },
}

const FIELDS: [&str; 4] = ["recipient", "payload", "payload_b64", "id"];

/// The fields of one line as JSON values, before their checks.
#[derive(Default)]
struct RawLine {
    values: [Option<Value>; 4],
    problem: Option<LineProblem>,
}

struct RawLineVisitor;

impl<'de> Visitor<'de> for RawLineVisitor {
    type Value = RawLine;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLine, A::Error> {
        let mut raw = RawLine::default();
        // Values are taken as `Value` (which accepts any JSON) and checked afterwards, so
        // that serde's type errors, which quote the offending value, never arise.
        while let Some(key) = map.next_key::<String>()? {
            match FIELDS.iter().position(|f| *f == key) {
                Some(i) => {
                    let v: Value = map.next_value()?;
                    if raw.values[i].is_some() {
                        raw.problem
                            .get_or_insert(LineProblem::DuplicateField(FIELDS[i]));
                    } else if !v.is_null() {
                        raw.values[i] = Some(v);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                    let shown = (key.len() <= 32
                        && !key.is_empty()
                        && key.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_'))
                    .then_some(key);
                    raw.problem.get_or_insert(LineProblem::UnknownField(shown));
                }
            }
        }
        Ok(raw)
    }
}

impl<'de> Deserialize<'de> for RawLine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawLine, D::Error> {
        d.deserialize_map(RawLineVisitor)
    }
}

/// Whether a line holds only whitespace (such lines are skipped, not messages).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Parses one line (`line_no` is 1-based; it is the client id when `id` is absent).
/// `null` counts as absent. The line must not be blank (see [`is_blank`]).
pub fn parse_line(
    line: &[u8],
    line_no: u64,
    bounds: &Bounds,
) -> Result<OutgoingMessage, LineProblem> {
    let raw: RawLine = serde_json::from_slice(line).map_err(|e| {
        // serde_json's own messages may quote a value; only the category and column
        // are used.
        match e.classify() {
            serde_json::error::Category::Eof => LineProblem::Truncated,
            serde_json::error::Category::Data => LineProblem::NotAnObject,
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                LineProblem::InvalidJson { column: e.column() }
            }
        }
    })?;
    if let Some(p) = raw.problem {
        return Err(p);
    }
    let [recipient, payload, payload_b64, id] = raw.values;
    let client_id = match id {
        None => line_no,
        Some(v) => v.as_u64().ok_or(LineProblem::BadId)?,
    };
    let recipient = match recipient {
        None => return Err(LineProblem::MissingRecipient),
        Some(Value::String(s)) => {
            Recipient::parse(s.as_bytes()).ok_or(LineProblem::InvalidRecipient)?
        }
        Some(_) => return Err(LineProblem::RecipientNotString),
    };
    let payload: Vec<u8> = match (payload, payload_b64) {
        (Some(_), Some(_)) => return Err(LineProblem::BothPayloads),
        (None, None) => return Err(LineProblem::NoPayload),
        (Some(Value::String(s)), None) => s.into_bytes(),
        (Some(_), None) => return Err(LineProblem::PayloadNotString("payload")),
        (None, Some(Value::String(s))) => base64_engine()
            .decode(s.trim_end_matches('='))
            .map_err(|_| LineProblem::InvalidBase64)?,
        (None, Some(_)) => return Err(LineProblem::PayloadNotString("payload_b64")),
    };
    if payload.is_empty() {
        return Err(LineProblem::EmptyPayload);
    }
    if payload.len() > bounds.payload_bytes_max as usize {
        return Err(LineProblem::PayloadTooLarge {
            bytes: payload.len(),
            max: bounds.payload_bytes_max,
        });
    }
    let m = OutgoingMessage {
        client_id,
        recipient,
        payload: Bytes::from(payload),
    };
    let alone = message_alone_bytes(&m);
    if alone > bounds.frame_bytes_max as usize {
        return Err(LineProblem::MessageTooLarge {
            bytes: alone,
            max: bounds.frame_bytes_max,
        });
    }
    Ok(m)
}

/// Standard alphabet; padding is stripped before decoding, so it is optional.
fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
    )
}

/// Reads a file line by line, each at most `max` bytes kept; longer lines are consumed
/// and reported without being kept.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    buf: Vec<u8>,
    line_no: u64,
    max: usize,
}

/// One line read by [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum ReadLine<'a> {
    /// The line, without its `\n`.
    Line(&'a [u8]),
    /// Over the bound; its bytes were skipped.
    TooLong,
}

impl<R: BufRead> LineReader<R> {
    /// Lines of `reader`, each at most `max` bytes.
    pub fn new(reader: R, max: usize) -> LineReader<R> {
        LineReader {
            reader,
            buf: Vec::new(),
            line_no: 0,
            max,
        }
    }

    /// The next line and its 1-based number; `None` at the end.
    pub fn next_line(&mut self) -> std::io::Result<Option<(u64, ReadLine<'_>)>> {
        self.buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            if !too_long {
                if self.buf.len() + chunk.len() > self.max {
                    too_long = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            let used = newline.map_or(available.len(), |i| i + 1);
            self.reader.consume(used);
            if newline.is_some() {
                break;
            }
        }
        self.line_no += 1;
        let line = if too_long {
            ReadLine::TooLong
        } else {
            ReadLine::Line(&self.buf)
        };
        Ok(Some((self.line_no, line)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;
    const NUMBER: &str = "+4915112345678";
    const SECRET: &str = "secret words for the door";

    fn parse(s: &str) -> Result<OutgoingMessage, LineProblem> {
        parse_line(s.as_bytes(), 7, &Bounds::WIDEST)
    }

    #[test]
    fn a_line_gives_a_message_with_its_id_or_its_line_number() {
        let m = parse(&format!(
            r#"{{"recipient":"{NUMBER}","payload":"{SECRET}"}}"#
        ))
        .unwrap();
        assert_eq!(m.client_id, 7, "the line number by default");
        assert_eq!(m.recipient.as_str(), NUMBER);
        assert_eq!(&m.payload[..], SECRET.as_bytes());
        let m = parse(&format!(
            r#"{{"id": 42, "recipient":"{NUMBER}","payload_b64":"AAEC/w=="}}"#
        ))
        .unwrap();
        assert_eq!(m.client_id, 42);
        assert_eq!(&m.payload[..], &[0, 1, 2, 255]);
        // Padding is optional; null counts as absent.
        let m = parse(&format!(
            r#"{{"id":null,"recipient":"{NUMBER}","payload":null,"payload_b64":"AAEC/w"}}"#
        ))
        .unwrap();
        assert_eq!((m.client_id, &m.payload[..]), (7, &[0u8, 1, 2, 255][..]));
        let m = parse(&format!(
            r#"{{"id":18446744073709551615,"recipient":"{NUMBER}","payload":"é"}}"#
        ))
        .unwrap();
        assert_eq!(m.client_id, u64::MAX);
        assert_eq!(&m.payload[..], "é".as_bytes());
    }

    #[test]
    fn each_bad_line_gets_its_reason() {
        let r = NUMBER;
        let cases: Vec<(String, LineProblem)> = vec![
            ("{".into(), LineProblem::Truncated),
            (
                "{\"recipient\" 1}".into(),
                LineProblem::InvalidJson { column: 14 },
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x"}} x"#),
                LineProblem::InvalidJson { column: 46 },
            ),
            (format!(r#"["{r}"]"#), LineProblem::NotAnObject),
            (format!(r#""{SECRET}""#), LineProblem::NotAnObject),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","to":1}}"#),
                LineProblem::UnknownField(Some("to".into())),
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","{r}":1}}"#),
                LineProblem::UnknownField(None),
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","payload":"y"}}"#),
                LineProblem::DuplicateField("payload"),
            ),
            (r#"{"payload":"x"}"#.into(), LineProblem::MissingRecipient),
            (
                r#"{"recipient":4915112345678,"payload":"x"}"#.into(),
                LineProblem::RecipientNotString,
            ),
            (
                r#"{"recipient":"4915112345678","payload":"x"}"#.into(),
                LineProblem::InvalidRecipient,
            ),
            (
                r#"{"recipient":"+0915112345678","payload":"x"}"#.into(),
                LineProblem::InvalidRecipient,
            ),
            (format!(r#"{{"recipient":"{r}"}}"#), LineProblem::NoPayload),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","payload_b64":"eA=="}}"#),
                LineProblem::BothPayloads,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":5}}"#),
                LineProblem::PayloadNotString("payload"),
            ),
            (
                format!(r#"{{"recipient":"{r}","payload_b64":"not base64!"}}"#),
                LineProblem::InvalidBase64,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":""}}"#),
                LineProblem::EmptyPayload,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","id":-1}}"#),
                LineProblem::BadId,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","id":"{r}"}}"#),
                LineProblem::BadId,
            ),
            (
                format!(r#"{{"recipient":"{r}","payload":"x","id":1.5}}"#),
                LineProblem::BadId,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(&line).unwrap_err(), want, "{line}");
        }
    }

    #[test]
    fn payloads_and_messages_over_the_bounds_are_bad() {
        let b = Bounds {
            payload_bytes_max: 10,
            frame_bytes_max: 40,
        };
        let line = |p: &str| format!(r#"{{"recipient":"{NUMBER}","payload":"{p}"}}"#);
        assert!(parse_line(line("0123456789").as_bytes(), 1, &b).is_err());
        assert_eq!(
            parse_line(line("01234567890").as_bytes(), 1, &b).unwrap_err(),
            LineProblem::PayloadTooLarge { bytes: 11, max: 10 }
        );
        // 12 + 13 + 14 + 10 = 49 bytes in a SUBMIT.
        assert_eq!(
            parse_line(line("0123456789").as_bytes(), 1, &b).unwrap_err(),
            LineProblem::MessageTooLarge { bytes: 49, max: 40 }
        );
        let wide = Bounds {
            payload_bytes_max: 10,
            frame_bytes_max: 49,
        };
        assert!(parse_line(line("0123456789").as_bytes(), 1, &wide).is_ok());
    }

    #[test]
    fn problems_never_show_the_number_or_the_payload() {
        let lines = [
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}","{NUMBER}":"{SECRET}"}}"#),
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}","id":"{NUMBER}"}}"#),
            format!(r#"{{"recipient":{},"payload":"{SECRET}"}}"#, &NUMBER[1..]),
            format!(r#"{{"recipient":"{NUMBER}","payload":["{SECRET}"]}}"#),
            format!(r#"{{"recipient":"{NUMBER}","payload_b64":"{SECRET}"}}"#),
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}"}} {SECRET}"#),
            format!(r#"{{"recipient":"{NUMBER}x","payload":"{SECRET}"}}"#),
            format!(r#"["{NUMBER}","{SECRET}"]"#),
            format!(r#"{{"recipient":"{NUMBER}","payload":"{SECRET}"#),
        ];
        for line in &lines {
            let p = parse(line).unwrap_err();
            let shown = format!("{p} {p:?}");
            assert!(!shown.contains(&NUMBER[1..]), "{shown}");
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn the_line_reader_bounds_lines_and_numbers_them() {
        let text = b"short\r\n0123456789abcdef\n\nlast";
        let mut r = LineReader::new(BufReader::with_capacity(4, &text[..]), 8);
        let mut got = Vec::new();
        while let Some((n, line)) = r.next_line().unwrap() {
            got.push((
                n,
                match line {
                    ReadLine::Line(l) => Some(l.to_vec()),
                    ReadLine::TooLong => None,
                },
            ));
        }
        assert_eq!(
            got,
            vec![
                (1, Some(b"short\r".to_vec())),
                (2, None),
                (3, Some(Vec::new())),
                (4, Some(b"last".to_vec())),
            ]
        );
    }
}
