"""One BLAS call for the kernels: C = op(A) @ op(B) on row-major (C-contiguous) float32/float64
matrices, op being the identity or the transpose, chosen by flag.

Numba's np.dot has no transpose flags, and copies any operand whose layout it cannot
prove at compile time; the kernels store hidden activations feature-major (features x rows), where
the BLAS runs its faster kernel (docs/performance.md, "Measurements behind the code"), and need
both layouts in one loop. This calls the
same BLAS np.dot calls (scipy's, through Numba's own `numba_xxgemm` helper, so compiled kernels
still cache to disk) with the flags given explicitly.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.linalg import check_blas_return, ensure_blas, get_blas_kind


@intrinsic
def _xxgemm(typingctx, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Column-major xGEMM on the data pointers of arrays a, b, c (Fortran argument order)."""
    ensure_blas()
    sig = types.void(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        ta, tb, m_, n_, k_, al, a_, lda_, b_, ldb_, be, c_, ldc_ = args
        tys = signature.args
        dtype = tys[11].dtype
        intp = context.get_value_type(types.intp)
        char, void_p = ir.IntType(8), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, void_p,
                                                void_p, intp, void_p, intp, void_p, void_p, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")

        def flag(v, ty):
            on = context.cast(builder, v, ty, types.boolean)
            return builder.select(on, ir.Constant(char, ord("t")), ir.Constant(char, ord("n")))

        def slot(v, ty):
            return builder.bitcast(
                cgutils.alloca_once_value(builder, context.cast(builder, v, ty, dtype)), void_p)

        def data(v, ty):
            return builder.bitcast(context.make_array(ty)(context, builder, v).data, void_p)

        def as_intp(v, ty):
            return context.cast(builder, v, ty, types.intp)

        res = builder.call(fn, (
            ir.Constant(char, ord(get_blas_kind(dtype))), flag(ta, tys[0]), flag(tb, tys[1]),
            as_intp(m_, tys[2]), as_intp(n_, tys[3]), as_intp(k_, tys[4]), slot(al, tys[5]),
            data(a_, tys[6]), as_intp(lda_, tys[7]), data(b_, tys[8]), as_intp(ldb_, tys[9]),
            slot(be, tys[10]), data(c_, tys[11]), as_intp(ldc_, tys[12])))
        check_blas_return(context, builder, res)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def gemm_(trans_a, A, trans_b, B, C):
    """C = op(A) @ op(B) for C-contiguous 2-D A, B, C of one dtype, where
    op(X) is X.T when its flag is set. op(A) is (M, K), op(B) is (K, N), C is (M, N)."""
    M, N = C.shape
    K = A.shape[0] if trans_a else A.shape[1]
    if (
        (A.shape[1] if trans_a else A.shape[0]) != M
        or (B.shape[0] if trans_b else B.shape[1]) != N
        or (B.shape[1] if trans_b else B.shape[0]) != K
    ):
        raise ValueError("gemm_: shapes do not match")
    if not (A.flags.c_contiguous and B.flags.c_contiguous and C.flags.c_contiguous):
        raise ValueError("gemm_: operands must be C-contiguous")
    if M == 0 or N == 0:
        return
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B first, flags kept
    _xxgemm(trans_b, trans_a, N, M, K, 1.0, B, max(B.shape[1], 1), A, max(A.shape[1], 1),
            0.0, C, N)
