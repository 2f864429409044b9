// What the AMX kernels (linear_amx.cpp, attention_amx.cpp) share: the process's permission to use
// the tiles, and the operand of ldtilecfg. Each kernel is its own extension; this header is part
// of each one's build key (kernels/cpu/build.py).
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace radixserve_amx {

// Linux lets a process use the AMX tile data only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM
// for XFEATURE_XTILEDATA); the permission is the whole process's.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

// True where this process may use the tile data (asked once); the kernels raise otherwise.
inline bool tiles_available() {
  static const bool granted =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace radixserve_amx
