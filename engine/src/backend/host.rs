//! Host-addressable memory as backends hold it: mappings the plan accounts for, and
//! heap memory for short-lived working values.

use crate::memory::Buffer;

pub enum HostBytes {
    /// A page-aligned mapping: weights read from disk, resident KV caches.
    Mapped(Buffer),
    /// Working memory (activations, KV on its way between places): small and
    /// short-lived, so it comes from the allocator rather than a fresh mapping (mapping
    /// and faulting in pages per operation would cost more than the operation).
    /// Words of 8 bytes keep it aligned for f32 and for any KV dtype.
    Heap { words: Vec<u64>, bytes: usize },
}

impl HostBytes {
    /// `bytes` zeroed bytes on the heap.
    pub fn heap(bytes: usize) -> HostBytes {
        HostBytes::Heap { words: vec![0; bytes.div_ceil(8)], bytes }
    }

    pub fn len_bytes(&self) -> usize {
        match self {
            HostBytes::Mapped(buffer) => buffer.len(),
            HostBytes::Heap { bytes, .. } => *bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostBytes::Mapped(buffer) => buffer.as_slice(),
            // SAFETY: `words` holds at least `bytes` initialised bytes; u8 has no alignment.
            HostBytes::Heap { words, bytes } => unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), *bytes) },
        }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            HostBytes::Mapped(buffer) => buffer.as_mut_slice(),
            // SAFETY: as above, borrowed exclusively.
            HostBytes::Heap { words, bytes } => unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), *bytes)
            },
        }
    }

    /// The bytes as f32 values (both kinds are at least 4-byte aligned).
    pub fn as_f32(&self) -> &[f32] {
        let bytes = self.as_bytes();
        // SAFETY: mappings are page-aligned and heap words 8-byte aligned; every bit
        // pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 4) }
    }

    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        let bytes = self.as_bytes_mut();
        // SAFETY: as above, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / 4) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_memory_is_zeroed_aligned_and_exactly_sized() {
        let mut heap = HostBytes::heap(10);
        assert_eq!(heap.as_bytes(), &[0u8; 10]);
        assert_eq!(heap.as_f32().len(), 2);
        assert_eq!(heap.as_bytes().as_ptr() as usize % 8, 0);
        heap.as_f32_mut()[1] = 1.5;
        assert_eq!(&heap.as_bytes()[4..8], &1.5f32.to_le_bytes());
    }
}
