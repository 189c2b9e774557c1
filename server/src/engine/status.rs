//! ONNX Runtime's C API answers an `OrtStatus`: null on success, else an error to read and
//! release. For the calls the `ort` crate does not wrap (the shared arena, tensor views).
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};

/// An OrtStatus as a result: the message of a failed call, the status released.
pub(super) fn check(status: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status is a live OrtStatus whose message is a C string; it is released
    // once read.
    let message = unsafe {
        let message: *const c_char = (api.GetErrorMessage)(status.0);
        let text = CStr::from_ptr(message).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(message)
}
