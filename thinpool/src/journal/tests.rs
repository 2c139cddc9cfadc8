use super::*;
use crate::storage::MemStorage;

const BOOT: [u8; 16] = [7; 16];
const OTHER_BOOT: [u8; 16] = [8; 16];

fn journal(storage: &Arc<MemStorage>, boot: [u8; 16]) -> Journal {
    Journal::open(storage.clone(), boot).unwrap()
}

/// A journal file whose halves hold `records` records each.
fn storage(records: u64) -> Arc<MemStorage> {
    Arc::new(MemStorage::new(2 * (HEADER_BYTES + records * RECORD_BYTES)))
}

fn map(vblock: u64, data_block: u64) -> Change {
    Change::Map {
        dev: 3,
        vblock,
        data_block,
    }
}

#[test]
fn changes_appended_after_a_reset_are_pending_for_that_superblock_only() {
    let s = storage(100);
    let mut j = journal(&s, BOOT);
    j.reset(42).unwrap();
    let changes = [map(0, 10), Change::Unmap { dev: 3, vblock: 0 }, map(9, 11)];
    for c in changes {
        j.append(c).unwrap();
    }
    // As a new process finds it.
    let again = journal(&s, BOOT);
    assert_eq!(again.pending(42).unwrap(), changes);
    // Another superblock: a commit made them durable after the header was written.
    assert!(again.pending(43).unwrap().is_empty());
}

#[test]
fn a_journal_written_before_a_reboot_is_ignored() {
    let s = storage(100);
    let mut j = journal(&s, BOOT);
    j.reset(1).unwrap();
    j.append(map(0, 10)).unwrap();
    assert!(journal(&s, OTHER_BOOT).pending(1).unwrap().is_empty());
}

#[test]
fn a_reset_drops_every_record_and_stale_ones_after_the_new_prefix_never_count() {
    let s = storage(100);
    let mut j = journal(&s, BOOT);
    j.reset(1).unwrap();
    for b in 0..5 {
        j.append(map(b, 100 + b)).unwrap();
    }
    // The commit of the same superblock identity cannot happen, but a void can.
    j.reset(1).unwrap();
    assert!(journal(&s, BOOT).pending(1).unwrap().is_empty());
    j.append(map(7, 200)).unwrap();
    // Slots 1..5 still hold the old generation's records: they do not check.
    assert_eq!(journal(&s, BOOT).pending(1).unwrap(), [map(7, 200)]);
}

#[test]
fn a_torn_record_ends_the_valid_prefix() {
    let s = storage(100);
    let mut j = journal(&s, BOOT);
    j.reset(5).unwrap();
    for b in 0..3 {
        j.append(map(b, 100 + b)).unwrap();
    }
    // Half of the second record made it.
    let mut torn = [0u8; 16];
    s.read_at(&mut torn, record_offset(s.len(), 0, 1)).unwrap();
    torn[12] ^= 0xff;
    s.write_at(&torn, record_offset(s.len(), 0, 1)).unwrap();
    assert_eq!(journal(&s, BOOT).pending(5).unwrap(), [map(0, 100)]);
}

#[test]
fn a_full_journal_refuses_before_anything_changes() {
    let s = storage(2);
    let mut j = journal(&s, BOOT);
    j.reset(5).unwrap();
    j.append(map(0, 1)).unwrap();
    j.append(map(1, 2)).unwrap();
    assert!(matches!(
        j.check_room(),
        Err(Error::JournalFull { records: 2 })
    ));
    assert!(matches!(
        j.append(map(2, 3)),
        Err(Error::JournalFull { .. })
    ));
    j.reset(6).unwrap();
    j.check_room().unwrap();
}

#[test]
fn a_frozen_journal_refuses_appends_and_keeps_its_records() {
    let s = storage(10);
    let mut j = journal(&s, BOOT);
    j.reset(5).unwrap();
    j.append(map(0, 1)).unwrap();
    j.freeze("a test");
    assert!(matches!(j.append(map(1, 2)), Err(Error::JournalRefused(_))));
    assert_eq!(journal(&s, BOOT).pending(5).unwrap(), [map(0, 1)]);
}

#[test]
fn a_zeroed_or_garbage_header_has_nothing_pending() {
    let s = storage(10);
    assert!(journal(&s, BOOT).pending(0).unwrap().is_empty());
    s.write_at(&[0xa5; 4096], 0).unwrap();
    assert!(journal(&s, BOOT).pending(0).unwrap().is_empty());
}

#[test]
fn changes_after_a_switch_count_over_either_superblock_a_crash_leaves() {
    let s = storage(10);
    let mut j = journal(&s, BOOT);
    j.reset(1).unwrap();
    j.append(map(0, 10)).unwrap();
    // Transaction frozen; its superblock (2) is being written while writes go on.
    j.switch(2).unwrap();
    j.append(map(1, 11)).unwrap();
    let again = journal(&s, BOOT);
    // The crash came before superblock 2 was durable: both transactions' changes.
    assert_eq!(again.pending(1).unwrap(), [map(0, 10), map(1, 11)]);
    // After: only the changes since the freeze.
    assert_eq!(again.pending(2).unwrap(), [map(1, 11)]);
    // The next freeze reuses the first half; its old records never count again.
    j.switch(3).unwrap();
    j.append(map(2, 12)).unwrap();
    let again = journal(&s, BOOT);
    assert_eq!(again.pending(2).unwrap(), [map(1, 11), map(2, 12)]);
    assert_eq!(again.pending(3).unwrap(), [map(2, 12)]);
    assert!(again.pending(1).unwrap().is_empty());
}

#[test]
fn a_half_that_follows_an_older_generation_is_not_replayed() {
    let s = storage(10);
    let mut j = journal(&s, BOOT);
    j.reset(1).unwrap();
    j.switch(2).unwrap();
    j.append(map(1, 11)).unwrap();
    // Restarted on superblock 2 (durable): a new generation over it, in the active half.
    j.reset(2).unwrap();
    j.append(map(5, 15)).unwrap();
    // The first half still names superblock 1, but nothing follows it any more.
    assert_eq!(journal(&s, BOOT).pending(2).unwrap(), [map(5, 15)]);
}

#[test]
fn a_version_1_journal_is_read_as_one_half() {
    let s = storage(10);
    let mut b = [0u8; 48];
    b[..8].copy_from_slice(MAGIC);
    put_u32(&mut b, 12, 1);
    b[16..32].copy_from_slice(&BOOT);
    put_u64(&mut b, 32, 77);
    put_u64(&mut b, 40, 9);
    let crc = crc32c::crc32c(&b[12..48]);
    put_u32(&mut b, 8, crc);
    s.write_at(&b, 0).unwrap();
    // A record past the middle of the file: version 1 records run to its end.
    let slot = (s.len() - HEADER_BYTES) / RECORD_BYTES - 1;
    for i in 0..=slot {
        s.write_at(
            &encode(map(i, 100 + i), 77),
            HEADER_BYTES + i * RECORD_BYTES,
        )
        .unwrap();
    }
    let pending = journal(&s, BOOT).pending(9).unwrap();
    assert_eq!(pending.len() as u64, slot + 1);
    assert_eq!(pending[slot as usize], map(slot, 100 + slot));
}

#[test]
fn boot_ids_parse_as_linux_prints_them() {
    assert_eq!(
        parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n"),
        Some([
            0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
            0xe1, 0xf0
        ])
    );
    assert_eq!(parse_boot_id("nope"), None);
    assert!(host_boot_id().is_ok());
}
