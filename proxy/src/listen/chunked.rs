//! Where a chunked request body ends (RFC 9112 §7.1), found by following its framing as the
//! bytes pass: the connection hands Pingora exactly the body and keeps what follows (the next
//! pipelined request) for itself. Strict where request smuggling hides: every line ends in
//! CRLF (a bare LF, also inside a chunk extension, is an error), chunk sizes are hex of at
//! most 16 digits, extensions and trailers hold no control bytes and are bounded.
//!
//! Pure; fuzzed in `fuzz/`.

/// Bytes of chunk extensions on one size line, and of the whole trailer section, accepted.
const LINE_LIMIT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size,
    /// After the size: whitespace and extensions until CR.
    Ext,
    /// The LF after a size line's CR.
    SizeLf,
    /// Chunk data, this many bytes left.
    Data(u64),
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line (or of the final empty line).
    Trailer,
    /// Inside a trailer field line.
    TrailerLine,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// The chunked framing is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

/// Follows one chunked body.
#[derive(Debug, Clone)]
pub(crate) struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    /// Bytes of the current extension / trailer section.
    line: usize,
    /// Chunk data announced so far (the body's size once done).
    total: u64,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            total: 0,
        }
    }
}

impl Chunked {
    /// Bytes of chunk data announced by the size lines seen so far (a chunk counts in full
    /// once its size line is read, before its data arrives).
    pub(crate) fn declared(&self) -> u64 {
        self.total
    }

    /// Whether the body is complete.
    pub(crate) fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Follow `bytes` (the next bytes of the body). Returns how many belong to the body: all of
    /// them, or fewer when the body ends within them.
    pub(crate) fn advance(&mut self, bytes: &[u8]) -> Result<usize, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                State::Done => return Ok(i),
                State::Data(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left {
                        State::DataCr
                    } else {
                        State::Data(left - take)
                    };
                    continue;
                }
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits > 0 || b != b'0' {
                            self.digits += 1;
                        }
                        if self.digits > 16 {
                            return Err(Malformed("chunk size too large"));
                        }
                        let v = (b as char).to_digit(16).unwrap_or(0);
                        self.size = (self.size << 4) | u64::from(v);
                        self.line += 1;
                    }
                    _ if self.line == 0 => return Err(Malformed("chunk size missing")),
                    b';' | b' ' | b'\t' => {
                        self.line = 0;
                        self.state = State::Ext;
                    }
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(Malformed("bare LF after a chunk size")),
                    _ => return Err(Malformed("invalid chunk size")),
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(Malformed("bare LF in a chunk extension")),
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                        self.line += 1;
                        if self.line > LINE_LIMIT {
                            return Err(Malformed("chunk extension too long"));
                        }
                    }
                    _ => return Err(Malformed("control byte in a chunk extension")),
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed("CR without LF after a chunk size"));
                    }
                    self.line = 0;
                    self.total = self.total.saturating_add(self.size);
                    self.state = if self.size == 0 {
                        State::Trailer
                    } else {
                        State::Data(self.size)
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(Malformed("chunk data longer than its size"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(Malformed("CR without LF after chunk data"));
                    }
                    self.size = 0;
                    self.digits = 0;
                    self.line = 0;
                    self.state = State::Size;
                }
                State::Trailer => match b {
                    b'\r' => self.state = State::EndLf,
                    b'\n' => return Err(Malformed("bare LF in the trailer section")),
                    _ => {
                        self.state = State::TrailerLine;
                        continue;
                    }
                },
                State::TrailerLine => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err(Malformed("bare LF in a trailer")),
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                        self.line += 1;
                        if self.line > LINE_LIMIT {
                            return Err(Malformed("trailer section too long"));
                        }
                    }
                    _ => return Err(Malformed("control byte in a trailer")),
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(Malformed("CR without LF in a trailer"));
                    }
                    self.state = State::Trailer;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(Malformed("CR without LF at the end of the body"));
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `body` in pieces of `step` bytes; the number of bytes that belong to the body.
    fn run(body: &[u8], step: usize) -> Result<usize, Malformed> {
        let mut c = Chunked::default();
        let mut taken = 0;
        for piece in body.chunks(step) {
            let n = c.advance(piece)?;
            taken += n;
            if c.done() {
                break;
            }
        }
        Ok(taken)
    }

    #[test]
    fn finds_the_end_however_the_bytes_arrive() {
        let body =
            b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let all = [&body[..], &next[..]].concat();
        for step in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(run(&all, step), Ok(body.len()), "step {step}");
        }
        assert_eq!(run(b"0\r\n\r\nrest", 100), Ok(5));
        assert_eq!(run(b"000\r\n\r\n", 100), Ok(7), "leading zeros");
    }

    #[test]
    fn smuggling_shapes_are_malformed() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5;ext\nhello\r\n0\r\n\r\n",
            b"5;a\x01b\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nX: 1\n\r\n",
            b"x\r\n",
            b"\r\n",
            b"-5\r\n",
            b"11111111111111111\r\n",
            b"5\rhello",
        ] {
            assert!(run(bad, 1).is_err(), "{:?}", String::from_utf8_lossy(bad));
            assert!(run(bad, 100).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long_ext = [&b"1;"[..], &[b'a'; 5000], b"\r\nx\r\n0\r\n\r\n"].concat();
        assert!(run(&long_ext, 100).is_err());
    }
}
