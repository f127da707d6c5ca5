//! The op enum: one variant per kernel parameter struct. Shape rules and encodings live with
//! the kernels ([`Kernel`]); the graph only stores and dispatches to them.

use crate::kernels::attention::Attention;
use crate::kernels::conv::Conv2d;
use crate::kernels::delta::{CausalConv, GatedDelta};
use crate::kernels::elementwise::{
    BinaryOp, Concat, CopyInto, Glu, SliceRows, TimestepEmbedding, Transpose, UnaryOp, Upsample2x,
};
use crate::kernels::linear::{Gather, Linear};
use crate::kernels::moe::{MoeCombine, MoeLinear, MoeLists, MoeRouter};
use crate::kernels::norm::{GroupNorm, LayerNorm, QkNorm, RmsNorm, Softmax};
use crate::kernels::rope::{Rope, RopeKv};
use crate::kernels::sample::{RandNormal, Sample};
use crate::kernels::scheduler::{LatentBlend, SchedulerStep};
use crate::kernels::Kernel;

macro_rules! ops {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// One operation of the graph. Fused ops are explicit variants.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $($variant($ty)),*
        }

        impl Op {
            /// The kernel computing this op (its shape rule and encoding).
            pub fn kernel(&self) -> &dyn Kernel {
                match self {
                    $(Op::$variant(k) => k),*
                }
            }
        }

        $(impl From<$ty> for Op {
            fn from(k: $ty) -> Op {
                Op::$variant(k)
            }
        })*
    };
}

ops!(
    Linear(Linear),
    Gather(Gather),
    Attention(Attention),
    Softmax(Softmax),
    RmsNorm(RmsNorm),
    QkNorm(QkNorm),
    LayerNorm(LayerNorm),
    GroupNorm(GroupNorm),
    Rope(Rope),
    RopeKv(RopeKv),
    Conv2d(Conv2d),
    CausalConv(CausalConv),
    GatedDelta(GatedDelta),
    MoeRouter(MoeRouter),
    MoeLists(MoeLists),
    MoeLinear(MoeLinear),
    MoeCombine(MoeCombine),
    Upsample2x(Upsample2x),
    Concat(Concat),
    Unary(UnaryOp),
    Binary(BinaryOp),
    Glu(Glu),
    TimestepEmbedding(TimestepEmbedding),
    SliceRows(SliceRows),
    Transpose(Transpose),
    CopyInto(CopyInto),
    Sample(Sample),
    RandNormal(RandNormal),
    SchedulerStep(SchedulerStep),
    LatentBlend(LatentBlend),
);

impl Op {
    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        self.kernel().name()
    }
}
