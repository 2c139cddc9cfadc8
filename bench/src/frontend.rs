//! The vhost-user side: "guest memory" (a memfd mapped in this process and shared with the
//! backend), the handshake, and the vring setup and teardown.

use crate::ring::{RingLayout, RING_ALIGN};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::EventFd;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: not in virtio-bindings.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Guest RAM: a shared memfd mapping; guest physical address = offset in the memfd.
pub struct GuestMem {
    _file: File,
    base: *mut u8,
    len: usize,
    fd: i32,
}

// SAFETY: the mapping is plain shared memory that lives as long as the process uses it;
// the ring code synchronises with atomics.
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    pub fn new(len: usize) -> Result<GuestMem> {
        // SAFETY: plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vhost-thin-bench".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: the fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .context("sizing the guest memory memfd")?;
        // SAFETY: mapping a fresh fd of `len` bytes; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the guest memory");
        }
        Ok(GuestMem {
            base: base.cast(),
            len,
            fd: file.as_raw_fd(),
            _file: file,
        })
    }

    /// Host pointer of guest address `gpa` for `len` bytes.
    pub fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            (gpa as usize)
                .checked_add(len)
                .is_some_and(|end| end <= self.len),
            "guest address {gpa:#x}+{len} outside guest memory"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base.add(gpa as usize) }
    }

    fn hva(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len as u64,
            userspace_addr: self.base as u64,
            mmap_offset: 0,
            mmap_handle: self.fd,
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// What the device said about itself.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device_features: u64,
    pub acked_features: u64,
    pub capacity_bytes: Option<u64>,
    pub size_max: Option<u32>,
    pub blk_size: Option<u32>,
    /// The largest DISCARD segment, in sectors (with VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: Option<u32>,
    pub device_queues: u64,
    pub read_only: bool,
}

/// Features this driver understands. EVENT_IDX and INDIRECT_DESC are deliberately not
/// acknowledged: one interrupt per used batch and flat chains keep the driver simple.
fn supported_features() -> u64 {
    1u64 << VIRTIO_F_VERSION_1
        | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_MQ
        | 1 << VIRTIO_BLK_F_RO
        | 1 << VIRTIO_BLK_F_DISCARD
}

pub struct Connection {
    pub fe: Frontend,
    pub info: DeviceInfo,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Connects and negotiates features, up to (not including) the memory table.
pub fn connect(sock: &Path, nq: usize) -> Result<Connection> {
    let mut fe = Frontend::connect(sock, nq as u64)
        .with_context(|| format!("cannot connect to {}", sock.display()))?;
    let device_features = fe.get_features().context("GET_FEATURES")?;
    if device_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) == 0 {
        bail!("the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES");
    }
    let proto = fe
        .get_protocol_features()
        .context("GET_PROTOCOL_FEATURES")?;
    // REPLY_ACK makes the backend acknowledge every setting message, so that a rejected
    // one (say, a ring larger than the backend allows) fails here instead of stalling.
    let want = proto
        & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK);
    fe.set_protocol_features(want)
        .context("SET_PROTOCOL_FEATURES")?;
    if want.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    fe.set_owner().context("SET_OWNER")?;
    let device_queues = if want.contains(VhostUserProtocolFeatures::MQ) {
        fe.get_queue_num().context("GET_QUEUE_NUM")?
    } else {
        1
    };
    if nq as u64 > device_queues {
        bail!("asked for {nq} queues, the device has {device_queues}");
    }
    let acked_features = device_features & supported_features();
    if acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        bail!("the backend does not offer VIRTIO_F_VERSION_1");
    }
    fe.set_features(acked_features).context("SET_FEATURES")?;
    let mut info = DeviceInfo {
        device_features,
        acked_features,
        capacity_bytes: None,
        size_max: None,
        blk_size: None,
        max_discard_sectors: None,
        device_queues,
        read_only: acked_features & (1 << VIRTIO_BLK_F_RO) != 0,
    };
    if want.contains(VhostUserProtocolFeatures::CONFIG) {
        // capacity (8) size_max (4) seg_max (4) geometry (4) blk_size (4)
        const LEN: u32 = 24;
        let (_, cfg) = fe
            .get_config(0, LEN, VhostUserConfigFlags::WRITABLE, &[0u8; LEN as usize])
            .context("GET_CONFIG")?;
        if cfg.len() >= LEN as usize {
            info.capacity_bytes = Some(u64::from_le_bytes(cfg[0..8].try_into().unwrap()) * 512);
            if acked_features & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0 {
                info.size_max = Some(le32(&cfg, 8));
            }
            if acked_features & (1 << VIRTIO_BLK_F_BLK_SIZE) != 0 {
                info.blk_size = Some(le32(&cfg, 20));
            }
        }
        if acked_features & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
            // ... topology (8) writeback (1) unused (1) num_queues (2) max_discard_sectors (4)
            const DLEN: u32 = 40;
            if let Ok((_, cfg)) = fe.get_config(
                0,
                DLEN,
                VhostUserConfigFlags::WRITABLE,
                &[0u8; DLEN as usize],
            ) {
                if cfg.len() >= DLEN as usize {
                    info.max_discard_sectors = Some(le32(&cfg, 36)).filter(|&n| n > 0);
                }
            }
        }
    }
    Ok(Connection { fe, info })
}

/// The eventfds of one vring.
pub struct VringFds {
    pub kick: EventFd,
    pub call: EventFd,
}

impl Connection {
    /// Sends the memory table and sets up and enables `layouts.len()` vrings.
    pub fn setup(&mut self, mem: &GuestMem, layouts: &[RingLayout]) -> Result<Vec<VringFds>> {
        self.fe
            .set_mem_table(&[mem.region()])
            .context("SET_MEM_TABLE")?;
        let mut fds = Vec::new();
        for (q, l) in layouts.iter().enumerate() {
            debug_assert_eq!(l.used % RING_ALIGN, 0);
            self.fe.set_vring_num(q, l.size).with_context(|| {
                format!(
                    "SET_VRING_NUM {} on queue {q} (the backend's limit? lower --iodepth or --queue-size)",
                    l.size
                )
            })?;
            self.fe.set_vring_base(q, 0).context("SET_VRING_BASE")?;
            self.fe
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: l.size,
                        queue_size: l.size,
                        flags: 0,
                        desc_table_addr: mem.hva(l.desc),
                        used_ring_addr: mem.hva(l.used),
                        avail_ring_addr: mem.hva(l.avail),
                        log_addr: None,
                    },
                )
                .context("SET_VRING_ADDR")?;
            let call = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
            self.fe.set_vring_call(q, &call).context("SET_VRING_CALL")?;
            self.fe.set_vring_kick(q, &kick).context("SET_VRING_KICK")?;
            self.fe
                .set_vring_enable(q, true)
                .context("SET_VRING_ENABLE")?;
            fds.push(VringFds { kick, call });
        }
        Ok(fds)
    }

    /// Stops the vrings (GET_VRING_BASE) so that the backend lets go of them.
    pub fn teardown(mut self, nq: usize) {
        for q in 0..nq {
            let _ = self.fe.set_vring_enable(q, false);
            let _ = self.fe.get_vring_base(q);
        }
    }
}
