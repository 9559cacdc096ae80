//! Other engines' command lines read back into Ferry's terms: the inverse of `export`,
//! for `ferry check`, which predicts what a command a user already has will do.

pub mod llama_cpp;
pub mod vllm;
