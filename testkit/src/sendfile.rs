//! Files for `courier send` (JSON lines): messages with and without explicit ids, in
//! UTF-8 and in base64 with bytes that are not UTF-8, a blank line; what the client
//! library's tests and the binary's tests both send.

use std::collections::BTreeMap;
use std::path::Path;

/// Every payload in these files starts with it; it must never show in any output.
pub const MARKER: &str = "SECRET-BODY-";

/// One message of a test file.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The explicit id, if the line has one.
    pub id: Option<u64>,
    /// The recipient as written.
    pub recipient: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// Written as `payload_b64`.
    pub base64: bool,
}

impl Msg {
    /// The `i`th message: a distinct recipient, a payload starting with [`MARKER`].
    pub fn new(i: u64) -> Msg {
        Msg {
            id: None,
            // Distinct recipients, fewer than the small profile's surge threshold.
            recipient: format!("+4930{:07}", 2_718_281 + i * 37),
            payload: format!("{MARKER}{i}-meet at the back door").into_bytes(),
            base64: false,
        }
    }

    /// Its line in a `courier send` file.
    pub fn line(&self) -> String {
        let id = self
            .id
            .map_or(String::new(), |id| format!(r#""id": {id}, "#));
        let payload = if self.base64 {
            format!(r#""payload_b64": "{}""#, b64(&self.payload))
        } else {
            format!(
                r#""payload": "{}""#,
                std::str::from_utf8(&self.payload).unwrap()
            )
        };
        format!(r#"{{{id}"recipient": "{}", {payload}}}"#, self.recipient)
    }
}

/// Standard base64 with padding (a test-side encoder, so the test does not trust the
/// decoder it checks).
pub fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = u32::from(chunk[0]) << 16
            | u32::from(*chunk.get(1).unwrap_or(&0)) << 8
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= n {
                out.push(A[(v >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A file of `n` messages: every third with an explicit id (1000 + line), every fourth
/// in base64 with bytes that are not UTF-8, a blank line after the fifth. Returns the
/// messages by client id.
pub fn write_file(path: &Path, n: u64) -> BTreeMap<u64, Msg> {
    let mut text = String::new();
    let mut by_id = BTreeMap::new();
    let mut line = 0;
    for i in 1..=n {
        line += 1;
        let mut m = Msg::new(i);
        if i % 3 == 0 {
            m.id = Some(1000 + line);
        }
        if i % 4 == 0 {
            m.base64 = true;
            m.payload.extend_from_slice(&[0, 0xff, 0xfe, b'\n']);
        }
        text.push_str(&m.line());
        text.push('\n');
        by_id.insert(m.id.unwrap_or(line), m);
        if i == 5 {
            text.push_str("   \n");
            line += 1;
        }
    }
    std::fs::write(path, text).unwrap();
    by_id
}
