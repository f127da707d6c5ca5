//! Stable Diffusion: the CLIP text encoder, the U-Net, the VAE decoder, their weights and
//! pipeline folder, and the schedulers of the denoising loop (all scheduler maths on the CPU
//! once per schedule, one GPU kernel per step, see [`schedulers`]).

pub mod blocks;
pub mod clip;
pub mod limits;
pub mod models;
pub mod pipeline;
pub mod schedulers;
pub mod unet;
pub mod vae;
