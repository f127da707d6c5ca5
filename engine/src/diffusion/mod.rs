//! Stable Diffusion: the CLIP text encoder, the U-Net, the VAE, their weights and
//! pipeline folder, and the schedulers of the denoising loop (all scheduler maths on the CPU
//! once per schedule, one GPU kernel per step, see [`schedulers`]); init images and masks for
//! img2img and inpainting ([`edit`]).

pub mod blocks;
pub mod clip;
pub mod edit;
pub mod limits;
pub mod lora;
pub mod models;
pub mod pipeline;
pub mod schedulers;
pub mod taesd;
pub mod unet;
pub mod vae;
