//! Opening KVM, with errors a user can act on.

use kvm_ioctls::Kvm;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: Wisp needs KVM (load the kvm module, or run on a host with virtualization)")]
    Missing,
    #[error("no permission to open /dev/kvm: add your user to the 'kvm' group or run as root")]
    PermissionDenied,
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
}

/// The KVM device: `$WISP_KVM` if set (a jailer-style set-up gives the
/// monitor its own device node, e.g. inside a chroot), else `/dev/kvm`.
pub fn device_path() -> std::ffi::CString {
    let path = std::env::var_os("WISP_KVM").unwrap_or_else(|| "/dev/kvm".into());
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .unwrap_or_else(|_| c"/dev/kvm".to_owned())
}

/// Opens the KVM device and checks the API version.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new_with_path(device_path()).map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        _ => KvmError::Open(e),
    })?;
    let v = kvm.get_api_version();
    if v != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(v));
    }
    Ok(kvm)
}
