//! NumPy's `.npy` format (version 1.0) for a matrix of f32: what `ferry run --logits`
//! writes so that another engine's logits compare with `numpy.load`.

use crate::error::{CoreError, Result};

/// The bytes of a `.npy` file holding `rows` (each the same length) as a C-order
/// little-endian f32 array of shape (rows, columns).
pub fn f32_matrix(rows: &[Vec<f32>]) -> Result<Vec<u8>> {
    let columns = rows.first().map_or(0, Vec::len);
    if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != columns) {
        return Err(CoreError::invalid(format!(
            "row {i} holds {} values where row 0 holds {columns}: not a matrix",
            row.len()
        )));
    }
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {columns}), }}", rows.len());
    // Magic (6) + version (2) + header length (2) + header, padded with spaces and ended
    // by a newline to a multiple of 64 bytes, so the data starts aligned.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.len() * columns * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for value in rows.iter().flatten() {
        out.extend_from_slice(&value.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matrix_has_numpys_header_aligned_data_and_its_values() {
        let bytes = f32_matrix(&[vec![1.0, 2.0, 3.0], vec![-4.0, 5.5, 0.0]]).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
        assert!(header.ends_with('\n'));
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 6 * 4);
        assert_eq!(f32::from_le_bytes(data[12..16].try_into().unwrap()), -4.0);
        assert!(f32_matrix(&[vec![1.0], vec![1.0, 2.0]]).unwrap_err().to_string().contains("row 1"));
    }
}
