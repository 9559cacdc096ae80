//! The messages stage processes exchange over TCP, framed as
//! `[u32 length][u8 kind][body]` (little-endian). Setup and reports are JSON (small,
//! once per run); a task's completion is binary, as it carries activations every step.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// A message's body may not exceed this (a hidden state of 64 K rows of 16 K f32 is
/// 4 GiB; anything larger is a corrupted or foreign stream).
const MAX_FRAME_BYTES: usize = 1 << 33;
/// The first bytes of every connection: not a ferry stage process otherwise.
pub const MAGIC: &[u8; 8] = b"ferry-s1";

/// What a task's completion carries to the processes that wait on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Carried {
    /// Nothing: the dependents only needed it done.
    Nothing,
    /// A micro-batch's activations that crossed the link (the parts the copy moves, in
    /// order), f32 each.
    Activations(Vec<Vec<f32>>),
    /// The head's token for each sequence of its micro-batch, and each one's logits
    /// when the run keeps them.
    Tokens { tokens: Vec<u32>, logits: Vec<Vec<f32>> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Head → worker: what to run (JSON of `Setup`).
    Setup(String),
    /// Worker → head: set up (resident weights read), with its graph's fingerprint.
    Ready { fingerprint: u64 },
    /// Head → workers: the clock starts.
    Start,
    /// The head (or a link probe) introducing itself to a stage worker.
    Hello { host: u16 },
    /// A worker introducing itself to another (workers join each other by host index).
    /// Distinct from `Hello`: a worker may connect before the head's own connection
    /// is accepted, and the worker must not take it for the head.
    Join { host: u16 },
    /// A task finished; the receiver waits on it.
    Done { task: u32, carried: Carried },
    /// Worker → head: its spans and arrivals (JSON of `StageReport`).
    Finished(String),
    /// The sender failed; the run is over.
    Failed(String),
    /// Measuring the link (`probe`): the receiver answers with an `Echo` carrying
    /// `reply_bytes` bytes.
    Echo { reply_bytes: u32, payload: Vec<u8> },
}

const SETUP: u8 = 1;
const READY: u8 = 2;
const START: u8 = 3;
const HELLO: u8 = 4;
const DONE: u8 = 5;
const FINISHED: u8 = 6;
const FAILED: u8 = 7;
const ECHO: u8 = 8;
const JOIN: u8 = 9;

const NOTHING: u8 = 0;
const ACTIVATIONS: u8 = 1;
const TOKENS: u8 = 2;

/// One process's measured part of a run, sent to the head at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageReport {
    pub host: u16,
    /// (task, lane, start ns, end ns) of every task this process ran.
    pub spans: Vec<(u32, u32, u64, u64)>,
    /// (task, ns) when a task's activations arrived here from another machine.
    pub arrivals: Vec<(u32, u64)>,
    pub peak_rss_bytes: u64,
    pub baseline_rss_bytes: u64,
    pub setup_ns: u64,
}

pub fn write(out: &mut impl Write, message: &Message) -> std::io::Result<()> {
    let mut body = Vec::new();
    let kind = match message {
        Message::Setup(json) => {
            body.extend_from_slice(json.as_bytes());
            SETUP
        }
        Message::Ready { fingerprint } => {
            body.extend_from_slice(&fingerprint.to_le_bytes());
            READY
        }
        Message::Start => START,
        Message::Hello { host } => {
            body.extend_from_slice(&host.to_le_bytes());
            HELLO
        }
        Message::Join { host } => {
            body.extend_from_slice(&host.to_le_bytes());
            JOIN
        }
        Message::Done { task, carried } => {
            body.extend_from_slice(&task.to_le_bytes());
            encode_carried(&mut body, carried);
            DONE
        }
        Message::Finished(json) => {
            body.extend_from_slice(json.as_bytes());
            FINISHED
        }
        Message::Failed(text) => {
            body.extend_from_slice(text.as_bytes());
            FAILED
        }
        Message::Echo { reply_bytes, payload } => {
            body.extend_from_slice(&reply_bytes.to_le_bytes());
            body.extend_from_slice(payload);
            ECHO
        }
    };
    out.write_all(&((body.len() + 1) as u64).to_le_bytes())?;
    out.write_all(&[kind])?;
    out.write_all(&body)?;
    out.flush()
}

fn encode_carried(body: &mut Vec<u8>, carried: &Carried) {
    let floats = |body: &mut Vec<u8>, values: &[f32]| {
        body.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            body.extend_from_slice(&v.to_le_bytes());
        }
    };
    match carried {
        Carried::Nothing => body.push(NOTHING),
        Carried::Activations(parts) => {
            body.push(ACTIVATIONS);
            body.extend_from_slice(&(parts.len() as u32).to_le_bytes());
            for part in parts {
                floats(body, part);
            }
        }
        Carried::Tokens { tokens, logits } => {
            body.push(TOKENS);
            body.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
            for t in tokens {
                body.extend_from_slice(&t.to_le_bytes());
            }
            body.extend_from_slice(&(logits.len() as u32).to_le_bytes());
            for row in logits {
                floats(body, row);
            }
        }
    }
}

/// The next message, or `None` at a clean end of stream (between messages).
pub fn read(input: &mut impl Read) -> std::io::Result<Option<Message>> {
    let mut length = [0u8; 8];
    // No byte at all is the end of the stream; part of a length is a cut one.
    let first = loop {
        match input.read(&mut length[..1]) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    if first == 0 {
        return Ok(None);
    }
    input.read_exact(&mut length[1..])?;
    let length = u64::from_le_bytes(length) as usize;
    if length == 0 || length > MAX_FRAME_BYTES {
        return Err(invalid(format!("a message of {length} bytes")));
    }
    let mut frame = vec![0u8; length];
    input.read_exact(&mut frame)?;
    let (kind, body) = (frame[0], &frame[1..]);
    let mut cursor = Cursor { body, at: 0 };
    let text = |body: &[u8]| String::from_utf8(body.to_vec()).map_err(|_| invalid("text that is not UTF-8".into()));
    let message = match kind {
        SETUP => Message::Setup(text(body)?),
        READY => Message::Ready { fingerprint: cursor.u64()? },
        START => Message::Start,
        HELLO => Message::Hello { host: u16::from_le_bytes(cursor.array()?) },
        JOIN => Message::Join { host: u16::from_le_bytes(cursor.array()?) },
        DONE => Message::Done { task: cursor.u32()?, carried: cursor.carried()? },
        FINISHED => Message::Finished(text(body)?),
        FAILED => Message::Failed(text(body)?),
        ECHO => Message::Echo { reply_bytes: cursor.u32()?, payload: body[4..].to_vec() },
        other => return Err(invalid(format!("a message of unknown kind {other}"))),
    };
    Ok(Some(message))
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a ferry stage stream: {what}"))
}

struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> std::io::Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.body.len());
        let end = end.ok_or_else(|| invalid("a message shorter than it says".into()))?;
        let out = &self.body[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn floats(&mut self) -> std::io::Result<Vec<f32>> {
        let n = self.u64()? as usize;
        let bytes = self.take(n.checked_mul(4).ok_or_else(|| invalid("an impossible length".into()))?)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn carried(&mut self) -> std::io::Result<Carried> {
        Ok(match self.take(1)?[0] {
            NOTHING => Carried::Nothing,
            ACTIVATIONS => {
                let parts = self.u32()?;
                Carried::Activations((0..parts).map(|_| self.floats()).collect::<Result<_, _>>()?)
            }
            TOKENS => {
                let n = self.u32()?;
                let tokens = (0..n).map(|_| self.u32()).collect::<Result<_, _>>()?;
                let rows = self.u32()?;
                let logits = (0..rows).map(|_| self.floats()).collect::<Result<_, _>>()?;
                Carried::Tokens { tokens, logits }
            }
            other => return Err(invalid(format!("a completion carrying kind {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let messages = [
            Message::Setup("{\"a\": 1}".into()),
            Message::Ready { fingerprint: 0xdead_beef_0123 },
            Message::Start,
            Message::Hello { host: 3 },
            Message::Join { host: 2 },
            Message::Done { task: 7, carried: Carried::Nothing },
            Message::Done { task: 9, carried: Carried::Activations(vec![vec![1.0, -2.5], vec![], vec![f32::MAX]]) },
            Message::Done { task: 11, carried: Carried::Tokens { tokens: vec![5, 6], logits: vec![vec![0.5; 3]] } },
            Message::Finished("{}".into()),
            Message::Failed("out of memory".into()),
            Message::Echo { reply_bytes: 16, payload: vec![7; 1000] },
        ];
        let mut stream = Vec::new();
        for m in &messages {
            write(&mut stream, m).unwrap();
        }
        let mut input = stream.as_slice();
        for m in &messages {
            assert_eq!(read(&mut input).unwrap().as_ref(), Some(m));
        }
        assert_eq!(read(&mut input).unwrap(), None, "a clean end of stream");
    }

    #[test]
    fn a_truncated_or_foreign_stream_is_an_error_not_a_panic() {
        let mut stream = Vec::new();
        write(&mut stream, &Message::Done { task: 1, carried: Carried::Activations(vec![vec![1.0; 8]]) }).unwrap();
        for cut in 1..stream.len() {
            let mut input = &stream[..cut];
            assert!(read(&mut input).is_err(), "cut at {cut}");
        }
        let mut http: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(read(&mut http).is_err());
        // A length that claims more than the body holds.
        let mut lying = Vec::new();
        lying.extend_from_slice(&6u64.to_le_bytes());
        lying.extend_from_slice(&[DONE, 1, 0, 0, 0, ACTIVATIONS]);
        assert!(read(&mut lying.as_slice()).is_err());
    }
}
