//! The body of the `send_line` fuzz target (the `fuzz/` crate, run with `cargo fuzz`): the
//! line reader and line parser of `courier send`. Kept in normal code so that `cargo test`
//! replays the committed corpus through it (`client/tests/fuzz_corpus.rs`).
//!
//! Not part of the public API: the name and input layout change with the target.

use base64::Engine;

use crate::send::{is_blank, parse_line, Bounds, LineReader, ReadLine};

/// Payload bounds the control byte picks from (the last one is the widest any profile
/// allows).
const PAYLOAD_MAX: [u32; 4] = [1, 16, 4096, Bounds::WIDEST.payload_bytes_max];

/// `data[0]` picks the bounds and the reader's line bound; the rest is a send file. Every
/// line read is a slice of the file between newlines (or too long); every message parsed
/// respects the bounds, and written back as a line (id, recipient, base64 payload) it
/// parses to the same message.
pub fn send_line(data: &[u8]) {
    let Some((&ctl, file)) = data.split_first() else {
        return;
    };
    let payload_bytes_max = PAYLOAD_MAX[usize::from(ctl & 3)];
    let bounds = Bounds {
        payload_bytes_max,
        frame_bytes_max: if ctl & 4 != 0 {
            1024
        } else {
            Bounds::WIDEST.frame_bytes_max
        },
    };
    let line_max = 8 + usize::from(ctl >> 3) * 64;
    let mut expected = file.split(|&b| b == b'\n');
    let mut reader = LineReader::new(file, line_max);
    // Bounded: each call consumes at least one byte or ends the file.
    for _ in 0..=file.len() {
        let Some((line_no, line)) = reader.next_line().expect("reading a slice cannot fail") else {
            break;
        };
        let want = expected
            .next()
            .expect("no more lines read than the file holds");
        let line = match line {
            ReadLine::TooLong => {
                assert!(want.len() > line_max, "only a long line is too long");
                continue;
            }
            ReadLine::Line(l) => l,
        };
        assert!(line == want, "a line is the bytes between newlines");
        if is_blank(line) {
            continue;
        }
        let Ok(m) = parse_line(line, line_no, &bounds) else {
            continue;
        };
        assert!(!m.payload.is_empty(), "a payload is never empty");
        assert!(
            m.payload.len() <= payload_bytes_max as usize,
            "a payload respects its bound"
        );
        let written = format!(
            r#"{{"id":{},"recipient":"{}","payload_b64":"{}"}}"#,
            m.client_id,
            m.recipient.as_str(),
            base64::engine::general_purpose::STANDARD.encode(&m.payload)
        );
        let back = parse_line(written.as_bytes(), line_no + 1, &bounds)
            .expect("a parsed message written back parses");
        assert!(back == m, "parse(write(message)) == message");
    }
}

/// Seed send files for the corpus (`client/tests/fuzz_corpus.rs` writes them).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let lines = concat!(
        r#"{"recipient":"+4915112345678","payload":"hello"}"#,
        "\n",
        r#"{"id": 42, "recipient":"+14155550123","payload_b64":"AAEC/w=="}"#,
        "\n\n   \n",
        r#"{"id": null, "recipient":"+14155550123","payload":"x","extra":1}"#,
        "\n",
        r#"{"recipient":"+1","payload":"short number"}"#,
        "\n",
        r#"{"recipient":"+4915112345678","payload":"a","payload_b64":"YQ"}"#,
        "\n",
        r#"{"recipient":"+4915112345678","payload_b64":"!!"}"#,
        "\n",
        r#"["not","an","object"]"#,
        "\n",
        r#"{"recipient":"+4915112345678","payload":"\u00e9\n"#,
    );
    let mut wide = vec![0b1111_1011u8];
    wide.extend_from_slice(lines.as_bytes());
    let mut narrow = vec![0b0000_0101u8];
    narrow.extend_from_slice(lines.as_bytes());
    vec![
        ("lines-wide".to_string(), wide),
        ("lines-narrow".to_string(), narrow),
    ]
}
