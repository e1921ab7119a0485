use super::format::*;
use super::*;

fn header() -> Header {
    Header {
        version: FORMAT_VERSION,
        mem_size: 16 << 20,
        mem_offset: 8192,
        file_len: 8192 + (16 << 20),
        sections: vec![SectionEntry {
            kind: Kind::Machine as u32,
            offset: 4096,
            len: 28,
            crc: 7,
        }],
    }
}

#[test]
fn header_round_trips() {
    let h = header();
    assert_eq!(Header::decode(&h.encode()).unwrap(), h);
}

#[test]
fn header_refuses_magic_version_and_corruption() {
    let page = header().encode();
    let mut bad = page.clone();
    bad[0] = b'X';
    assert!(matches!(
        Header::decode(&bad),
        Err(SnapshotError::NotASnapshot)
    ));
    let mut other = header();
    other.version = FORMAT_VERSION + 1;
    assert!(matches!(
        Header::decode(&other.encode()),
        Err(SnapshotError::Version { found, .. }) if found == FORMAT_VERSION + 1
    ));
    let mut flipped = page.clone();
    flipped[30] ^= 1; // inside mem_size
    assert!(matches!(
        Header::decode(&flipped),
        Err(SnapshotError::Corrupt("header"))
    ));
}

#[test]
fn devices_round_trip() {
    let mut entry = Device::new(DEVICE_NET);
    entry.mac[..6].copy_from_slice(&GUEST_MAC);
    let q = QueueState {
        max_size: 256,
        next_avail: 17,
        next_used: 15,
        event_idx_enabled: true,
        size: 256,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
    };
    let rec = DeviceRecord {
        entry,
        features: 1 << 32,
        transport: TransportState {
            status: 15,
            activated: true,
            acked_features: 1 << 32,
            queues: vec![QueueState::default(); 2],
            active: vec![q, q],
            ..Default::default()
        },
    };
    let bytes = encode_devices(std::slice::from_ref(&rec));
    assert_eq!(decode_devices(&bytes).unwrap(), vec![rec]);
    // A count larger than the section can hold is refused, not allocated.
    let mut huge = bytes.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_devices(&huge),
        Err(SnapshotError::Corrupt("devices"))
    ));
    assert!(decode_devices(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn clones_get_distinct_macs() {
    let a = clone_mac(1, 0);
    let b = clone_mac(2, 0);
    assert_ne!(a, b);
    assert_ne!(a, GUEST_MAC);
    assert_ne!(clone_mac(0x1234, 0), GUEST_MAC);
    assert_eq!(a[0] & 2, 2, "locally administered");
}
