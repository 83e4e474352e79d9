//! A Server-Sent Events parser for byte chunks as they arrive (lines may span chunks).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Feed chunks, take complete events.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseMessage,
    has_data: bool,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseMessage> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if self.has_data {
                    out.push(std::mem::take(&mut self.current));
                } else {
                    self.current = SseMessage::default();
                }
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment (keep-alive)
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (line.to_string(), String::new()),
            };
            match field.as_str() {
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(&value);
                    self.has_data = true;
                }
                "event" => self.current.event = Some(value),
                "id" => self.current.id = Some(value),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_comments_are_skipped() {
        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\nid: 1\nevent: met").is_empty());
        let got = p.push(b"rics\r\ndata: {\"a\":\ndata: 1}\n\nid: 2\ndata: x\n\n");
        assert_eq!(
            got,
            vec![
                SseMessage {
                    id: Some("1".into()),
                    event: Some("metrics".into()),
                    data: "{\"a\":\n1}".into()
                },
                SseMessage {
                    id: Some("2".into()),
                    event: None,
                    data: "x".into()
                },
            ]
        );
    }
}
