//! FFmpeg's C API where ffmpeg-next has no safe call for what the decoder needs.
//!
//! Opening a container from a custom I/O context with the stream probing held to the pixel
//! limit: `avformat_find_stream_info` decodes a few frames of every stream to fill in what the
//! container leaves out, with decoders of its own. ffmpeg-next opens them with no options, so a
//! stream whose headers claim a huge picture would be decoded at that size (with its reference
//! frames) before the server had looked at its dimensions. Here each of those decoders gets
//! `max_pixels`, as the server's own decoders do, and one thread.
//!
//! Probing also asks, through FFmpeg's interrupt callback, whether the call has ended or run
//! out of time, and stops then.
//!
//! Reading the rotation and mirroring of a stream's display matrix, and setting a colour
//! converter's source matrix and range, as FFmpeg's own tools do.
#![allow(unsafe_code)]

use std::ffi::{CString, c_int, c_void};
use std::ptr;

use ffmpeg::Dictionary;
use ffmpeg::ffi;
use ffmpeg::format::context::{Input, StreamIo};
use ffmpeg_next as ffmpeg;
use image::metadata::Orientation;

/// Opens `io` as an input with the demuxer `options`, then probes its streams with decoders
/// that refuse pictures of more than `max_pixels`. FFmpeg asks `stop` as it probes (its
/// interrupt callback) and gives up with `AVERROR_EXIT` once it answers true.
pub(super) fn open_input(
    mut io: StreamIo,
    options: Dictionary<'_>,
    max_pixels: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Input, ffmpeg::Error> {
    let max_pixels = CString::new(max_pixels.min(i32::MAX as u64).to_string())
        .map_err(|_| ffmpeg::Error::Bug)?;
    // SAFETY: the context is allocated here and handed to `avformat_open_input`, which frees it
    // on failure; on success it is wrapped at once into an `Input` that owns it and `io` (the
    // custom I/O context it reads through) and closes both when dropped, as
    // `ffmpeg::format::input_from_stream` does. The per-stream dictionaries are created and
    // freed here; FFmpeg only reads them and leaves what it did not use in them. The interrupt
    // callback points at `stop`, which outlives this call, and is unset before it returns.
    let stop: *const &dyn Fn() -> bool = &stop;
    unsafe {
        let mut context = ffi::avformat_alloc_context();
        if context.is_null() {
            return Err(ffmpeg::Error::Other { errno: ffi::ENOMEM });
        }
        (*context).pb = io.as_mut_ptr();
        (*context).flags |= ffi::AVFMT_FLAG_CUSTOM_IO;
        (*context).interrupt_callback = ffi::AVIOInterruptCB {
            callback: Some(interrupted),
            opaque: stop.cast_mut().cast(),
        };
        let mut demuxer_options = options.disown();
        let opened = ffi::avformat_open_input(
            &mut context,
            ptr::null(),
            ptr::null_mut(),
            &mut demuxer_options,
        );
        drop(Dictionary::own(demuxer_options));
        if opened != 0 {
            return Err(ffmpeg::Error::from(opened));
        }
        let input = Input::wrap_with_custom_io(context, io);
        let streams = (*context).nb_streams as usize;
        let mut per_stream: Vec<*mut ffi::AVDictionary> = vec![ptr::null_mut(); streams];
        for dictionary in &mut per_stream {
            ffi::av_dict_set(dictionary, c"max_pixels".as_ptr(), max_pixels.as_ptr(), 0);
            ffi::av_dict_set(dictionary, c"threads".as_ptr(), c"1".as_ptr(), 0);
        }
        let probed = ffi::avformat_find_stream_info(context, per_stream.as_mut_ptr());
        (*context).interrupt_callback = ffi::AVIOInterruptCB {
            callback: None,
            opaque: ptr::null_mut(),
        };
        for dictionary in &mut per_stream {
            ffi::av_dict_free(dictionary);
        }
        if probed < 0 {
            return Err(ffmpeg::Error::from(probed));
        }
        Ok(input)
    }
}

/// Frames `decoder` keeps while it decodes: the one being decoded, the reference frames its
/// stream declares (at least one) and the frames it holds back to reorder them.
pub(super) fn kept_frames(decoder: &ffmpeg::decoder::Video) -> u64 {
    // SAFETY: the decoder is a live, opened codec context; two of its integer fields are read.
    let (refs, reorder) = unsafe {
        let context = decoder.as_ptr();
        ((*context).refs, (*context).has_b_frames)
    };
    let count = |n: i32| u64::try_from(n).unwrap_or(0);
    1 + count(refs).max(1) + count(reorder)
}

/// FFmpeg's interrupt callback: 1 once the `&dyn Fn() -> bool` behind `opaque` answers true.
unsafe extern "C" fn interrupted(opaque: *mut c_void) -> c_int {
    // SAFETY: `open_input` sets `opaque` to its `stop`, alive while the callback is set.
    let stop = unsafe { &*opaque.cast_const().cast::<&dyn Fn() -> bool>() };
    c_int::from(stop())
}

/// What shows a picture as the display matrix `data` (nine native 32-bit integers, as FFmpeg
/// gives a stream's `AV_PKT_DATA_DISPLAYMATRIX` side data) says: its rotation to the nearest
/// quarter turn, and a mirroring, told apart as recent versions of FFmpeg's command-line tool
/// do when they autorotate; `None` when the data is too short or the matrix degenerate.
pub(super) fn display_orientation(data: &[u8]) -> Option<Orientation> {
    if data.len() < 36 {
        return None;
    }
    let mut matrix = [0i32; 9];
    for (value, bytes) in matrix.iter_mut().zip(data.chunks_exact(4)) {
        *value = i32::from_ne_bytes(bytes.try_into().ok()?);
    }
    // SAFETY: `matrix` holds the nine values the function reads.
    let counterclockwise = unsafe { ffi::av_display_rotation_get(matrix.as_ptr()) };
    if !counterclockwise.is_finite() {
        return None;
    }
    let clockwise_turns = ((-counterclockwise / 90.0).round() as i64).rem_euclid(4);
    Some(match clockwise_turns {
        1 if matrix[3] > 0 => Orientation::Rotate90FlipH,
        1 => Orientation::Rotate90,
        2 => match (matrix[0] < 0, matrix[4] < 0) {
            (true, true) => Orientation::Rotate180,
            (true, false) => Orientation::FlipHorizontal,
            (false, true) => Orientation::FlipVertical,
            (false, false) => Orientation::NoTransforms,
        },
        3 if matrix[3] < 0 => Orientation::Rotate270FlipH,
        3 => Orientation::Rotate270,
        _ if matrix[4] < 0 => Orientation::FlipVertical,
        _ => Orientation::NoTransforms,
    })
}

/// Sets `scaler`'s source colour matrix to `space` and its range to `range`, each only when the
/// frames say (an unspecified one keeps what the converter chose for the pixel format: full
/// range for the `yuvj` formats of JPEG-based codecs, BT.601 otherwise), as FFmpeg's scale
/// filter does.
pub(super) fn set_source_colours(
    scaler: &mut ffmpeg::software::scaling::Context,
    space: ffmpeg::color::Space,
    range: ffmpeg::color::Range,
) {
    use ffmpeg::color::{Range, Space};
    let full = match range {
        Range::JPEG => Some(1),
        Range::MPEG => Some(0),
        Range::Unspecified => None,
    };
    let space = (space != Space::Unspecified).then(|| ffi::AVColorSpace::from(space) as i32);
    if full.is_none() && space.is_none() {
        return;
    }
    // SAFETY: the converter is a live context; the details are read from it and written back
    // with the source matrix and range replaced, the matrix a static table of FFmpeg's (which
    // falls back to its default for a colour space it has no table for).
    unsafe {
        let context = scaler.as_mut_ptr();
        let (mut inverse, mut source_range, mut table, mut target_range) =
            (ptr::null_mut(), 0, ptr::null_mut(), 0);
        let (mut brightness, mut contrast, mut saturation) = (0, 0, 0);
        let read = ffi::sws_getColorspaceDetails(
            context,
            &mut inverse,
            &mut source_range,
            &mut table,
            &mut target_range,
            &mut brightness,
            &mut contrast,
            &mut saturation,
        );
        if read < 0 {
            return;
        }
        let inverse = match space {
            Some(space) => ffi::sws_getCoefficients(space),
            None => inverse.cast_const(),
        };
        ffi::sws_setColorspaceDetails(
            context,
            inverse,
            full.unwrap_or(source_range),
            table.cast_const(),
            target_range,
            brightness,
            contrast,
            saturation,
        );
    }
}
