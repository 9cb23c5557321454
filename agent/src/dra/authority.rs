//! The registration socket's one quirk: the kubelet's plugin watcher dials
//! it with grpc-go given a bare socket path, so its requests carry that
//! path as HTTP/2 `:authority` (`/var/lib/kubelet/plugins_registry/…`),
//! which is not an authority and which h2 — under tonic — refuses with
//! PROTOCOL_ERROR (hyperium/h2#487, open since 2020; the kubelet's DRA
//! client dials `unix:<path>` and sends `localhost`, so the DRA socket
//! needs none of this).
//!
//! So the registration socket is a forwarder: the kubelet's bytes pass to
//! the real gRPC server on a private socket with each `:authority` value
//! in a HEADERS frame's header block replaced by `localhost`; the answers
//! pass back untouched. The replacement keeps the header block's shape:
//! a literal stays a literal of the same kind, so the HPACK dynamic table
//! keeps the same entries in the same order on both sides (only the
//! entry's size differs, by less than a path's length: the connection
//! makes two requests, far below the 4 KiB table size).

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// HTTP/2's client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types and flags used here.
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What replaces the path.
const AUTHORITY: &[u8] = b"localhost";

/// Serves `listener` by forwarding each connection to `inner`.
pub async fn forward(listener: tokio::net::UnixListener, inner: PathBuf) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let allowed = client
            .peer_cred()
            .is_ok_and(|c| crate::server::may_call(c.uid()));
        if !allowed {
            tracing::warn!(
                "refused a connection to the DRA registration socket: only root (the kubelet) may call"
            );
            continue;
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::UnixStream::connect(&inner).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = async move {
                let _ = rewrite(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            };
            let down = async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

/// Copies a client's HTTP/2 bytes from `from` to `to`, frame by frame,
/// with `:authority` replaced in header blocks.
async fn rewrite(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> std::io::Result<()> {
    let mut preface = [0u8; PREFACE.len()];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2: pass it on as it is; the server says no.
        tokio::io::copy(from, to).await?;
        return Ok(());
    }
    // A header block split over HEADERS + CONTINUATION frames, gathered.
    let mut pending: Option<(u8, u32, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        from.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (ty, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        match (ty, pending.take()) {
            (HEADERS, None) => {
                let Some(block) = header_block(flags, &payload) else {
                    write_frame(to, ty, flags, stream, &payload).await?;
                    continue;
                };
                if flags & END_HEADERS != 0 {
                    let block = replace_authority(block).unwrap_or_else(|| block.to_vec());
                    write_frame(to, ty, flags & !(PADDED | PRIORITY), stream, &block).await?;
                } else {
                    pending = Some((flags, stream, block.to_vec()));
                }
            }
            (CONTINUATION, Some((first, id, mut block))) => {
                block.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    let block = replace_authority(&block).unwrap_or(block);
                    let flags = (first | END_HEADERS) & !(PADDED | PRIORITY);
                    write_frame(to, HEADERS, flags, id, &block).await?;
                } else {
                    pending = Some((first, id, block));
                }
            }
            (_, held) => {
                pending = held;
                write_frame(to, ty, flags, stream, &payload).await?;
            }
        }
    }
}

async fn write_frame(
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    ty: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut head = [len[1], len[2], len[3], ty, flags, 0, 0, 0, 0];
    head[5..].copy_from_slice(&stream.to_be_bytes());
    to.write_all(&head).await?;
    to.write_all(payload).await
}

/// A HEADERS frame's header block fragment (padding and priority taken
/// off); `None` when the frame is malformed (then forwarded as it is).
fn header_block(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = *payload.first()? as usize;
        start += 1;
        end = end.checked_sub(pad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

/// The header block with every `:authority` value (its name indexed as
/// static entry 1 or written out) replaced by [`AUTHORITY`]; `None` when
/// the block does not parse (it is then forwarded unchanged).
fn replace_authority(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len());
    let mut at = 0;
    while at < block.len() {
        let b = block[at];
        if b & 0x80 != 0 {
            // Indexed field.
            let (_, n) = integer(&block[at..], 7)?;
            out.extend_from_slice(&block[at..at + n]);
            at += n;
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            let (_, n) = integer(&block[at..], 5)?;
            out.extend_from_slice(&block[at..at + n]);
            at += n;
        } else {
            // A literal: with incremental indexing (6-bit name index) or
            // without / never indexed (4-bit).
            let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
            let (index, n) = integer(&block[at..], prefix)?;
            let mut next = at + n;
            let authority = if index == 0 {
                let (name, used) = string(&block[next..])?;
                next += used;
                name == b":authority"
            } else {
                index == 1
            };
            let value_len = string(&block[next..])?.1;
            out.extend_from_slice(&block[at..next]);
            if authority {
                out.push(AUTHORITY.len() as u8);
                out.extend_from_slice(AUTHORITY);
            } else {
                out.extend_from_slice(&block[next..next + value_len]);
            }
            at = next + value_len;
        }
    }
    Some(out)
}

/// An HPACK integer with an `n`-bit prefix: its value and bytes used.
fn integer(bytes: &[u8], n: u32) -> Option<(u64, usize)> {
    let max = (1u64 << n) - 1;
    let mut value = u64::from(*bytes.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0;
    for (i, b) in bytes.iter().enumerate().skip(1) {
        value += u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
        if shift > 56 {
            return None;
        }
    }
    None
}

/// An HPACK string: its raw bytes (Huffman-coded ones as they are: only
/// `:authority`'s name is compared, and grpc-go indexes that one) and the
/// bytes used.
fn string(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let (len, n) = integer(bytes, 7)?;
    let end = n.checked_add(usize::try_from(len).ok()?)?;
    Some((bytes.get(n..end)?, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block as grpc-go's encoder writes its first request:
    /// `:method POST` (static 3), `:scheme http` (static 6), `:path`
    /// literal with indexing (name 4), `:authority` literal with indexing
    /// (name 1) holding the socket path, `content-type` literal.
    fn block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        b.push(0x44);
        b.push(15);
        b.extend_from_slice(b"/x.Reg/GetInfo!");
        b.push(0x41);
        b.push(authority.len() as u8);
        b.extend_from_slice(authority);
        b.push(0x00);
        b.push(12);
        b.extend_from_slice(b"content-type");
        b.push(16);
        b.extend_from_slice(b"application/grpc");
        b
    }

    #[test]
    fn the_socket_path_becomes_localhost_and_nothing_else_changes() {
        let path = b"/var/lib/kubelet/plugins_registry/railnet.io-reg.sock";
        assert_eq!(
            replace_authority(&block(path)).unwrap(),
            block(b"localhost")
        );
        // Written out by name, never indexed: replaced too.
        let mut named = vec![0x10, 10];
        named.extend_from_slice(b":authority");
        named.push(path.len() as u8);
        named.extend_from_slice(path);
        let mut want = vec![0x10, 10];
        want.extend_from_slice(b":authority");
        want.push(9);
        want.extend_from_slice(b"localhost");
        assert_eq!(replace_authority(&named).unwrap(), want);
        // A truncated block is not rewritten.
        assert_eq!(replace_authority(&block(path)[..20]), None);
    }

    #[tokio::test]
    async fn frames_pass_with_padding_and_priority_taken_off_headers() {
        let path = b"/p.sock";
        let mut input = PREFACE.to_vec();
        // SETTINGS (type 4), empty.
        input.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        // HEADERS, END_HEADERS|PADDED|PRIORITY, stream 1: pad 2, 5 bytes
        // of priority, the block, 2 bytes of padding.
        let b = block(path);
        let mut payload = vec![2, 0, 0, 0, 0, 16];
        payload.extend_from_slice(&b);
        payload.extend_from_slice(&[0, 0]);
        let len = (payload.len() as u32).to_be_bytes();
        input.extend_from_slice(&[
            len[1],
            len[2],
            len[3],
            HEADERS,
            END_HEADERS | PADDED | PRIORITY,
            0,
            0,
            0,
            1,
        ]);
        input.extend_from_slice(&payload);
        let mut out = Vec::new();
        let err = rewrite(&mut input.as_slice(), &mut out).await.unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "ends with the input"
        );
        let mut want = PREFACE.to_vec();
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let nb = block(b"localhost");
        let len = (nb.len() as u32).to_be_bytes();
        want.extend_from_slice(&[len[1], len[2], len[3], HEADERS, END_HEADERS, 0, 0, 0, 1]);
        want.extend_from_slice(&nb);
        assert_eq!(out, want);
    }
}
