# CPU kernels are compiled once per instruction set: csrc/cpu/*_avx512.cpp with AVX-512 flags,
# csrc/cpu/*_avx2.cpp with AVX2/FMA/F16C flags, and the portable code with the default flags.
# The variant that runs is chosen at run time from the CPU's features (csrc/cpu/isa.cpp), so a
# built wheel runs on any x86-64 and never executes an instruction the CPU lacks.
# These files include no torch header: they take pointers and sizes, and their functions live in
# a namespace named after the instruction set, so nothing compiled with wide flags can be merged
# into code that runs everywhere.
include(CheckCXXCompilerFlag)
set(_avx512_flags -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mbmi2)
set(_avx2_flags -mavx2 -mfma -mf16c -mbmi2)
check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512vl -mavx512dq" EXAONE_CC_HAS_AVX512)
check_cxx_compiler_flag("-mavx2 -mfma -mf16c" EXAONE_CC_HAS_AVX2)
check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16" EXAONE_CC_HAS_AVX512BF16)
check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni" EXAONE_CC_HAS_AVX512VNNI)

add_library(exaone_cpu_isa INTERFACE)
file(GLOB _avx512_src CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*_avx512.cpp")
file(GLOB _avx512bf16_src CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*_avx512bf16.cpp")
file(GLOB _avx512vnni_src CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*_avx512vnni.cpp")
file(GLOB _avx2_src CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cpu/*_avx2.cpp")

function(exaone_isa_objects name flags sources define)
  add_library(${name} OBJECT ${sources})
  target_include_directories(${name} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
  target_compile_options(${name} PRIVATE ${flags} -fno-math-errno)
  target_compile_definitions(${name} PRIVATE _GLIBCXX_USE_CXX11_ABI=${EXAONE_TORCH_CXX11_ABI})
  target_link_libraries(exaone_cpu_isa INTERFACE $<TARGET_OBJECTS:${name}>)
  target_compile_definitions(exaone_cpu_isa INTERFACE ${define}=1)
endfunction()

if(EXAONE_CC_HAS_AVX512 AND _avx512_src)
  exaone_isa_objects(exaone_cpu_avx512 "${_avx512_flags}" "${_avx512_src}" EXAONE_HAVE_AVX512)
endif()
# Kernels using AVX512-BF16 instructions on top of AVX-512 (run only when the CPU reports avx512bf16).
if(EXAONE_CC_HAS_AVX512 AND EXAONE_CC_HAS_AVX512BF16 AND _avx512bf16_src)
  exaone_isa_objects(exaone_cpu_avx512bf16 "${_avx512_flags};-mavx512bf16" "${_avx512bf16_src}" EXAONE_HAVE_AVX512BF16)
endif()
# Kernels using AVX512-VNNI integer dot products on top of AVX-512 (run only when the CPU reports avx512vnni).
if(EXAONE_CC_HAS_AVX512 AND EXAONE_CC_HAS_AVX512VNNI AND _avx512vnni_src)
  exaone_isa_objects(exaone_cpu_avx512vnni "${_avx512_flags};-mavx512vnni" "${_avx512vnni_src}" EXAONE_HAVE_AVX512VNNI)
endif()
if(EXAONE_CC_HAS_AVX2 AND _avx2_src)
  exaone_isa_objects(exaone_cpu_avx2 "${_avx2_flags}" "${_avx2_src}" EXAONE_HAVE_AVX2)
endif()
