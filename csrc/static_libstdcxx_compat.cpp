// Built only into wheels (MIXKIT_STATIC_LIBSTDCXX). The static libstdc++ of
// GCC 12 pulls std::random_device into every link (through its exception
// classes), and random_device calls arc4random, which glibc only has from 2.36.
// That one import alone would tag the wheel manylinux_2_36 and shut out
// Ubuntu 22.04 (glibc 2.35). mixkit never uses random_device, so a private
// definition backed by getrandom(2) (glibc 2.25) resolves it inside _core.
#include <sys/random.h>

#include <cstdint>

extern "C" __attribute__((visibility("hidden"))) uint32_t arc4random(void) {
  uint32_t v = 0;
  while (getrandom(&v, sizeof v, 0) != sizeof v) {
  }
  return v;
}
