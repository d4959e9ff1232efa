//! Requests whose `:authority` is not one.
//!
//! gRPC clients built on grpc-core (Python, C++, Ruby) and on grpc-java send the socket's
//! path as the `:authority` of a request over a Unix socket (`run%2Fagentwall%2Fworkload.sock`
//! or `/run/agentwall/workload.sock`). The HTTP/2 stack of the daemon holds an authority to
//! the URI grammar and resets such a stream, so py-spiffe and java-spiffe would never get an
//! identity. An authority means nothing on a local socket: the daemon sets it to
//! `localhost` in every request on the way in.
//!
//! It does so without sharing compression state with either side. The client's header blocks
//! are decoded with a decoder of the daemon's own (the client's HPACK context), and the stack
//! receives the same fields as plain literals, which touch no dynamic table: the two contexts
//! cannot drift apart whatever the client does. Every other frame passes byte for byte.
//!
//! The rewriter holds the bounds of the stack behind it: frames of at most [`MAX_FRAME`]
//! bytes, a compressed block of at most [`MAX_BLOCK`], decoded fields of at most
//! [`HEADER_LIST`]. Past a bound, or on a block that does not decode, the connection ends.

use std::{borrow::Cow, fmt};

use loona_hpack::{Decoder, decoder::DecoderError, encoder::encode_integer_into};

use crate::limits::WORKLOAD_HEADER_LIST as HEADER_LIST;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which the stack checks itself.
const PREFACE: usize = 24;
/// Length, type, flags, stream.
const FRAME_HEAD: usize = 9;
/// The largest frame payload a client may send: the HTTP/2 default, which the daemon does
/// not raise.
pub(crate) const MAX_FRAME: usize = 16 * 1024;
/// The largest compressed header block (HEADERS and its CONTINUATIONs). Huffman coding can
/// make a field's text longer than the field, though not by more than four times.
pub(crate) const MAX_BLOCK: usize = 4 * HEADER_LIST;
/// The rewriter stops taking input once this much output waits to be read.
pub(crate) const READY_MAX: usize = 64 * 1024;
/// The dynamic table the client's encoder may use: the HTTP/2 default, which the daemon's
/// stack announces.
const TABLE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const AUTHORITY: &[u8] = b":authority";
const LOCAL: &[u8] = b"localhost";

/// Why a connection ends in the rewriter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RewriteError {
    #[error("a header frame of {0} bytes, over the limit of {MAX_FRAME}")]
    FrameTooLarge(usize),
    #[error("a header block over {MAX_BLOCK} bytes")]
    BlockTooLarge,
    #[error("header fields over {HEADER_LIST} bytes decoded")]
    FieldsTooLarge,
    #[error("a frame of type {0:#x} inside a header block")]
    Interrupted(u8),
    #[error("a continuation of stream {got} inside the header block of stream {expected}")]
    OtherStream { expected: u32, got: u32 },
    #[error("a header frame whose padding or priority does not fit it")]
    Malformed,
    #[error("a header block that does not decode: {0}")]
    Hpack(String),
}

/// Where the reader is in the client's bytes.
enum State {
    Preface(usize),
    Head,
    Pass(usize),
    Collect {
        kind: u8,
        flags: u8,
        stream: u32,
        need: usize,
        payload: Vec<u8>,
    },
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    bytes: Vec<u8>,
}

/// The client-to-daemon half of a connection, as a transformer of bytes.
pub(crate) struct Rewriter {
    decoder: Decoder<'static>,
    state: State,
    head: [u8; FRAME_HEAD],
    have: usize,
    block: Option<Block>,
}

impl fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rewriter")
            .field("in_block", &self.block.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE);
        Self {
            decoder,
            state: State::Preface(PREFACE),
            head: [0; FRAME_HEAD],
            have: 0,
            block: None,
        }
    }
}

impl Rewriter {
    /// Takes the next bytes the client sent and appends what the stack is to read to `out`;
    /// returns how many it took. It stops once `out` holds [`READY_MAX`] bytes: the caller
    /// feeds the rest when the stack has read them. A partial frame waits for the rest.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        let whole = input.len();
        let mut input = input;
        while !input.is_empty() && out.len() < READY_MAX {
            match &mut self.state {
                State::Preface(left) | State::Pass(left) => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Head => {
                    let n = (FRAME_HEAD - self.have).min(input.len());
                    self.head[self.have..self.have + n].copy_from_slice(&input[..n]);
                    self.have += n;
                    input = &input[n..];
                    if self.have == FRAME_HEAD {
                        self.have = 0;
                        self.frame(out)?;
                    }
                }
                State::Collect { need, payload, .. } => {
                    let n = (*need - payload.len()).min(input.len());
                    payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if payload.len() == *need {
                        self.collected(out)?;
                    }
                }
            }
        }
        Ok(whole - input.len())
    }

    /// A frame's head is in: header frames are gathered, the rest passes.
    fn frame(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let h = self.head;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let gathered = match &self.block {
            Some(_) if kind != CONTINUATION => return Err(RewriteError::Interrupted(kind)),
            Some(b) if b.stream != stream => {
                return Err(RewriteError::OtherStream {
                    expected: b.stream,
                    got: stream,
                });
            }
            Some(_) => true,
            // A CONTINUATION out of place is the stack's to refuse.
            None => kind == HEADERS,
        };
        if !gathered {
            out.extend_from_slice(&h);
            self.state = if len == 0 {
                State::Head
            } else {
                State::Pass(len)
            };
            return Ok(());
        }
        if len > MAX_FRAME {
            return Err(RewriteError::FrameTooLarge(len));
        }
        self.state = State::Collect {
            kind,
            flags,
            stream,
            need: len,
            payload: Vec::with_capacity(len),
        };
        if len == 0 {
            self.collected(out)?;
        }
        Ok(())
    }

    /// A header frame's payload is in.
    fn collected(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let State::Collect {
            kind,
            flags,
            stream,
            payload,
            ..
        } = std::mem::replace(&mut self.state, State::Head)
        else {
            return Ok(());
        };
        let mut block = match self.block.take() {
            Some(mut b) => {
                b.bytes.extend_from_slice(&payload);
                b
            }
            None => {
                debug_assert_eq!(kind, HEADERS, "only HEADERS opens a block");
                let mut p = payload.as_slice();
                if flags & PADDED != 0 {
                    let (&pad, rest) = p.split_first().ok_or(RewriteError::Malformed)?;
                    let keep = rest
                        .len()
                        .checked_sub(usize::from(pad))
                        .ok_or(RewriteError::Malformed)?;
                    p = &rest[..keep];
                }
                let priority = if flags & PRIORITY != 0 {
                    let (fields, rest) =
                        p.split_first_chunk::<5>().ok_or(RewriteError::Malformed)?;
                    p = rest;
                    Some(*fields)
                } else {
                    None
                };
                Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    bytes: p.to_vec(),
                }
            }
        };
        if block.bytes.len() > MAX_BLOCK {
            return Err(RewriteError::BlockTooLarge);
        }
        if flags & END_HEADERS == 0 {
            self.block = Some(block);
            return Ok(());
        }
        let fields = self.rewrite(&block.bytes)?;
        block.bytes = fields;
        emit(&block, out);
        Ok(())
    }

    /// The block's fields, decoded in the client's context and written again as literals,
    /// with `:authority` set to `localhost`.
    fn rewrite(&mut self, block: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut fields = Vec::with_capacity(block.len() + LOCAL.len());
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                // The size HTTP/2 gives a header list: each field's name, value and 32.
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= HEADER_LIST {
                    let value = if *name == *AUTHORITY { LOCAL } else { &value };
                    literal(&mut fields, &name, value);
                }
            })
            .map_err(|e: DecoderError| RewriteError::Hpack(e.to_string()))?;
        if size > HEADER_LIST {
            return Err(RewriteError::FieldsTooLarge);
        }
        Ok(fields)
    }
}

/// A field as a literal without indexing, its name and value as plain strings.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    for s in [name, value] {
        // Writing to a Vec does not fail.
        let _ = encode_integer_into(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

/// The block as a HEADERS frame and as many CONTINUATIONs as its size needs.
fn emit(block: &Block, out: &mut Vec<u8>) {
    let prio = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let first = block.bytes.len().min(MAX_FRAME - prio.len());
    let (head, mut rest) = block.bytes.split_at(first);
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if !prio.is_empty() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_head(out, prio.len() + head.len(), HEADERS, flags, block.stream);
    out.extend_from_slice(prio);
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
        let flags = if more.is_empty() { END_HEADERS } else { 0 };
        frame_head(out, chunk.len(), CONTINUATION, flags, block.stream);
        out.extend_from_slice(chunk);
        rest = more;
    }
}

fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use loona_hpack::Encoder;

    use super::*;

    const PRI: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame_head(&mut f, payload.len(), kind, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    /// The frames of `bytes` after the preface, as (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PRI));
        bytes = &bytes[PRI.len()..];
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            v.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        v
    }

    fn decoded(d: &mut Decoder<'_>, block: &[u8]) -> Vec<(String, String)> {
        d.decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn request(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (&b":method"[..], b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()),
            (b":authority", authority.to_vec()),
            (b"workload.spiffe.io", b"true".to_vec()),
        ]
    }

    fn encode(e: &mut Encoder<'_>, fields: &[(&'static [u8], Vec<u8>)]) -> Vec<u8> {
        e.encode(fields.iter().map(|(n, v)| (*n, v.as_slice())))
    }

    /// Feeds `input` one byte at a time, as the slowest socket would.
    fn feed_bytewise(r: &mut Rewriter, input: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut out = Vec::new();
        for b in input {
            r.feed(std::slice::from_ref(b), &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_across_requests() {
        // The client's encoder indexes the authority: the second request refers to the
        // table entry. The stack's view (a fresh decoder) must still see localhost.
        let mut client = Encoder::new();
        let mut input = PRI.to_vec();
        let path = b"run%2Fagentwall%2Fworkload.sock";
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut client, &request(path)),
        ));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &encode(&mut client, &request(path)),
        ));
        let out = feed_bytewise(&mut Rewriter::default(), &input).unwrap();
        let mut stack = Decoder::new();
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert_eq!(
            (f[1].0, f[1].1, f[1].3.as_slice()),
            (0x0, END_STREAM, &b"\0\0\0\0\0"[..])
        );
        for (i, stream, flags) in [(0, 1, END_HEADERS), (2, 3, END_HEADERS | END_STREAM)] {
            assert_eq!((f[i].0, f[i].1, f[i].2), (HEADERS, flags, stream));
            let fields = decoded(&mut stack, &f[i].3);
            assert_eq!(fields[3], (":authority".into(), "localhost".into()));
            assert_eq!(fields[2].1, "/SpiffeWorkloadAPI/FetchX509SVID");
            assert_eq!(fields[4], ("workload.spiffe.io".into(), "true".into()));
        }
    }

    #[test]
    fn padding_priority_and_continuations_are_read_and_written_again() {
        let mut client = Encoder::new();
        let block = encode(&mut client, &request(b"/run/x.sock"));
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PRI.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let out = feed_bytewise(&mut Rewriter::default(), &input).unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].0, f[0].1),
            (HEADERS, PRIORITY | END_STREAM | END_HEADERS)
        );
        assert_eq!(&f[0].3[..5], &[0, 0, 0, 0, 16]);
        let fields = decoded(&mut Decoder::new(), &f[0].3[5..]);
        assert_eq!(fields[3].1, "localhost");
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut client = Encoder::new();
        let mut fields = request(b"/x");
        let big = vec![b'a'; 6000];
        for n in [&b"x-one"[..], b"x-two"] {
            fields.push((n, big.clone()));
        }
        let block = encode(&mut client, &fields);
        let mut input = PRI.to_vec();
        // The client's block fits one frame; raw literals need more than one.
        let (a, b) = block.split_at(MAX_FRAME.min(block.len()));
        input.extend(frame(
            HEADERS,
            if b.is_empty() { END_HEADERS } else { 0 },
            1,
            a,
        ));
        if !b.is_empty() {
            input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        }
        let mut out = Vec::new();
        Rewriter::default().feed(&input, &mut out).unwrap();
        let f = frames(&out);
        let joined: Vec<u8> = f.iter().flat_map(|x| x.3.clone()).collect();
        assert!(f.iter().all(|x| x.3.len() <= MAX_FRAME));
        assert_eq!(f.last().unwrap().1 & END_HEADERS, END_HEADERS);
        assert_eq!(decoded(&mut Decoder::new(), &joined).len(), 7);
    }

    #[test]
    fn bounds_and_broken_blocks_end_the_connection() {
        let mut r = Rewriter::default();
        let mut input = PRI.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME + 1]));
        assert_eq!(
            r.feed(&input, &mut Vec::new()),
            Err(RewriteError::FrameTooLarge(MAX_FRAME + 1))
        );

        // An indexed table entry repeated: few bytes, many decoded ones.
        let mut client = Encoder::new();
        let mut block = encode(&mut client, &[(&b"x-big"[..], vec![b'a'; 4000])]);
        block.extend(std::iter::repeat_n(0xbe, 8));
        let mut input = PRI.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        assert_eq!(
            Rewriter::default().feed(&input, &mut Vec::new()),
            Err(RewriteError::FieldsTooLarge)
        );

        for (frames_in, want) in [
            (
                [frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, b"x")].concat(),
                RewriteError::Interrupted(0x0),
            ),
            (
                [
                    frame(HEADERS, 0, 1, &[0x82]),
                    frame(CONTINUATION, END_HEADERS, 3, &[0x86]),
                ]
                .concat(),
                RewriteError::OtherStream {
                    expected: 1,
                    got: 3,
                },
            ),
            (
                frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
                RewriteError::Malformed,
            ),
            (
                frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
                RewriteError::Malformed,
            ),
        ] {
            let input = [PRI, &frames_in].concat();
            assert_eq!(Rewriter::default().feed(&input, &mut Vec::new()), Err(want));
        }
        let input = [
            PRI,
            &frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0x7f]),
        ]
        .concat();
        assert!(matches!(
            Rewriter::default().feed(&input, &mut Vec::new()),
            Err(RewriteError::Hpack(_))
        ));
    }

    #[test]
    fn a_few_bytes_that_decode_to_many_are_taken_a_bounded_piece_at_a_time() {
        // One large indexed field, then frames of four references to it: 13 bytes each
        // that decode to 16 KB each.
        let mut client = Encoder::new();
        let first = encode(&mut client, &[(&b"x"[..], vec![b'a'; 4000])]);
        let mut input = PRI.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        for stream in 0..600u32 {
            input.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3 + 2 * stream,
                &[0xbe; 4],
            ));
        }
        let mut r = Rewriter::default();
        let mut rest = input.as_slice();
        let mut rounds = 0;
        while !rest.is_empty() {
            let mut out = Vec::new();
            let used = r.feed(rest, &mut out).unwrap();
            assert!(used > 0, "each round takes some input");
            assert!(
                out.len() < READY_MAX + 2 * MAX_FRAME,
                "{} bytes at once",
                out.len()
            );
            rest = &rest[used..];
            rounds += 1;
        }
        assert!(rounds > 100, "{rounds} rounds");
    }

    #[test]
    fn a_block_may_not_grow_without_bound_across_continuations() {
        let mut input = PRI.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0; MAX_FRAME]));
        for _ in 0..4 {
            input.extend(frame(CONTINUATION, 0, 1, &vec![0; MAX_FRAME]));
        }
        assert_eq!(
            Rewriter::default().feed(&input, &mut Vec::new()),
            Err(RewriteError::BlockTooLarge)
        );
    }
}
