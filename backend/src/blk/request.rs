//! virtio-blk request parsing: a descriptor chain in, a plain [`Request`] out.
//!
//! Pure: it sees the chain as a list of [`Desc`] and guest memory through the tiny
//! [`GuestView`] trait, does no I/O on the disk and allocates only the segment lists, so
//! it can be fuzzed with arbitrary chains. Layout rules (virtio 1.2 §5.2.6): the
//! device-readable descriptors come first and start with the 16-byte header (type u32,
//! reserved u32, sector u64); the device-writable ones come last and end with the 1-byte
//! status. Descriptors may split or merge those parts any way the driver likes.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

pub const SECTOR: u64 = 512;
pub const HEADER_LEN: u64 = 16;
pub const SEGMENT_LEN: u64 = 16;
/// Largest data transfer one request may carry; the seg_max and size_max offered to the
/// guest are derived from it (`blk::backend::segment_limits`).
pub const MAX_DATA_BYTES: u64 = 32 << 20;

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A piece of guest memory holding request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
}

/// What the parser needs of guest memory.
pub trait GuestView {
    /// Whether `[addr, addr + len)` is backed by guest memory (in one region).
    fn contains(&self, addr: u64, len: u64) -> bool;
    /// Reads guest memory; false when it is not backed.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// What the device is, for bounds and permission checks.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub max_discard_seg: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub max_write_zeroes_sectors: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read into `data`.
    Read {
        offset: u64,
        data: Vec<Seg>,
    },
    /// Write from `data`.
    Write {
        offset: u64,
        data: Vec<Seg>,
    },
    Flush,
    /// Fill `data` with the serial (as much as fits, at most 20 bytes).
    GetId {
        data: Vec<Seg>,
    },
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Guest address of the status byte.
    pub status: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("a device-readable descriptor follows a device-writable one")]
    BadOrder,
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("descriptor at {addr:#x}+{len} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("request header is {0} bytes, needs 16")]
    ShortHeader(u64),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data buffer in the wrong direction for this request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("data length {0} is above the limit")]
    TooLong(u64),
    #[error("sectors {sector}+{sectors} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard/write-zeroes payload of {0} bytes is not whole segments")]
    BadSegments(u64),
    #[error("{0} segments, more than the {1} allowed")]
    TooManySegments(u64, u32),
    #[error("segment flags {0:#x} are not supported for this request")]
    BadFlags(u32),
}

impl ParseError {
    /// UNSUPP for what the device does not do, IOERR for everything else.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, ParseError::Unsupported(_) | ParseError::BadFlags(_))
    }
}

/// Parse result: the status byte's address when there is one (so even a bad request
/// can be answered), and the request or why it is bad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub status: Option<u64>,
    pub request: Result<Request, ParseError>,
}

/// The byte range `[skip, skip + take)` of the concatenated descriptors, as segments.
fn slice(descs: &[Desc], mut skip: u64, mut take: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    for d in descs {
        if take == 0 {
            break;
        }
        let len = d.len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push(Seg {
            addr: d.addr + skip,
            len: n as u32,
        });
        take -= n;
        skip = 0;
    }
    out
}

fn read_bytes(mem: &impl GuestView, segs: &[Seg], buf: &mut [u8]) -> bool {
    let mut o = 0usize;
    for s in segs {
        let n = s.len as usize;
        if o + n > buf.len() || !mem.read(s.addr, &mut buf[o..o + n]) {
            return false;
        }
        o += n;
    }
    o == buf.len()
}

fn check_range(sector: u64, bytes: u64, capacity: u64) -> Result<u64, ParseError> {
    let sectors = bytes / SECTOR;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(sector * SECTOR),
        _ => Err(ParseError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

pub fn parse(descs: &[Desc], mem: &impl GuestView, limits: &Limits) -> Parsed {
    let Some(split) = layout(descs) else {
        return Parsed {
            status: None,
            request: Err(if descs.is_empty() {
                ParseError::Empty
            } else {
                ParseError::BadOrder
            }),
        };
    };
    let (readable, writable) = descs.split_at(split);
    let w_total: u64 = writable.iter().map(|d| d.len as u64).sum();
    let status = writable
        .iter()
        .rev()
        .find(|d| d.len > 0)
        .map(|d| d.addr.wrapping_add(d.len as u64 - 1))
        .filter(|&a| mem.contains(a, 1));
    let request = parse_body(readable, writable, w_total, mem, limits);
    match status {
        None => Parsed {
            status: None,
            request: Err(request.err().unwrap_or(ParseError::NoStatus)),
        },
        Some(status) => Parsed {
            status: Some(status),
            request: request.map(|op| Request { op, status }),
        },
    }
}

/// Index of the first writable descriptor, or None when the order is wrong or it is empty.
fn layout(descs: &[Desc]) -> Option<usize> {
    if descs.is_empty() {
        return None;
    }
    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[split..].iter().any(|d| !d.writable) {
        return None;
    }
    Some(split)
}

fn parse_body(
    readable: &[Desc],
    writable: &[Desc],
    w_total: u64,
    mem: &impl GuestView,
    limits: &Limits,
) -> Result<Op, ParseError> {
    for d in readable.iter().chain(writable) {
        if d.len > 0 && !mem.contains(d.addr, d.len as u64) {
            return Err(ParseError::OutOfMemory {
                addr: d.addr,
                len: d.len,
            });
        }
    }
    if w_total == 0 {
        return Err(ParseError::NoStatus);
    }
    let r_total: u64 = readable.iter().map(|d| d.len as u64).sum();
    if r_total < HEADER_LEN {
        return Err(ParseError::ShortHeader(r_total));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if !read_bytes(mem, &slice(readable, 0, HEADER_LEN), &mut hdr) {
        return Err(ParseError::ShortHeader(r_total));
    }
    let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let r_data = r_total - HEADER_LEN;
    let w_data = w_total - 1;
    let data_len = |len: u64| -> Result<(), ParseError> {
        if len % SECTOR != 0 {
            return Err(ParseError::Unaligned(len));
        }
        if len > MAX_DATA_BYTES {
            return Err(ParseError::TooLong(len));
        }
        Ok(())
    };
    match kind {
        VIRTIO_BLK_T_IN => {
            if r_data != 0 {
                return Err(ParseError::WrongDirection);
            }
            data_len(w_data)?;
            let offset = check_range(sector, w_data, limits.capacity_sectors)?;
            Ok(Op::Read {
                offset,
                data: slice(writable, 0, w_data),
            })
        }
        VIRTIO_BLK_T_OUT => {
            if w_data != 0 {
                return Err(ParseError::WrongDirection);
            }
            data_len(r_data)?;
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let offset = check_range(sector, r_data, limits.capacity_sectors)?;
            Ok(Op::Write {
                offset,
                data: slice(readable, HEADER_LEN, r_data),
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if w_data == 0 {
                return Err(ParseError::WrongDirection);
            }
            Ok(Op::GetId {
                data: slice(writable, 0, w_data.min(20)),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if w_data != 0 {
                return Err(ParseError::WrongDirection);
            }
            if r_data == 0 || r_data % SEGMENT_LEN != 0 {
                return Err(ParseError::BadSegments(r_data));
            }
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let n = r_data / SEGMENT_LEN;
            if n > max_seg as u64 {
                return Err(ParseError::TooManySegments(n, max_seg));
            }
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let mut ranges = Vec::with_capacity(n as usize);
            for i in 0..n {
                let mut seg = [0u8; SEGMENT_LEN as usize];
                let at = slice(readable, HEADER_LEN + i * SEGMENT_LEN, SEGMENT_LEN);
                if !read_bytes(mem, &at, &mut seg) {
                    return Err(ParseError::BadSegments(r_data));
                }
                let s = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(ParseError::BadFlags(flags));
                }
                if num > max_sectors {
                    return Err(ParseError::TooLong(num as u64 * SECTOR));
                }
                let offset = check_range(s, num as u64 * SECTOR, limits.capacity_sectors)?;
                ranges.push(Range {
                    offset,
                    len: num as u64 * SECTOR,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
            Ok(if discard {
                Op::Discard(ranges)
            } else {
                Op::WriteZeroes(ranges)
            })
        }
        other => Err(ParseError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests;
