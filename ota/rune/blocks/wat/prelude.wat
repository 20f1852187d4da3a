;; prelude.wat: the part every built-in block shares (fleet-block/1 ABI).
;;
;; It is pasted into each block's `(module ...)` ahead of the block's own body, so everything here
;; is named `$p_...`. It provides the exported `memory` and `fleet_alloc`, a bump allocator, the
;; result record, an error-message builder, typed element loads and stores (any numeric type to
;; and from f64), input checks, arg lookup, and exp().
;;
;; Memory map (addresses in bytes):
;;   0..7        never used, so no result or message sits at address 0
;;   8..19       the 12-byte result record (status, count, ptr) every call returns
;;   256..767    prelude strings, NUL-terminated (message text and element type names)
;;   1024..2559  block strings, NUL-terminated (each block places its own here)
;;   2560..3071  error-message buffer (messages longer than 512 bytes are cut)
;;   3072..3103  scratch for number formatting
;;   4096..      heap: [state a block keeps][host region][outputs, bumped upward]
;; `fleet_alloc` hands the host the region at `$p_host_base`; outputs are bumped from the 8-aligned
;; end of that region and forgotten at the start of each `fleet_transform`, so the host region is
;; never written by the block. State a block must keep after `fleet_configure` (label's words) is
;; taken with `$p_keep`, which also moves the host base above it.

  (memory (export "memory") 1)

  (global $p_host_base (mut i32) (i32.const 4096))
  (global $p_host_end (mut i32) (i32.const 4096))
  (global $p_top (mut i32) (i32.const 4096))
  (global $p_msg_len (mut i32) (i32.const 0))

  (data (i32.const 256) "out of memory\00")
  (data (i32.const 288) ": expected exactly 1 input tensor, got \00")
  (data (i32.const 336) ": the input's rank \00")
  (data (i32.const 360) " is not between 1 and 8\00")
  (data (i32.const 392) ": the input has an unknown element type code \00")
  (data (i32.const 440) ": the input has \00")
  (data (i32.const 464) " bytes of data, but its dimensions need \00")
  (data (i32.const 512) ": the input lies outside the block's memory\00")
  (data (i32.const 560) ": the input must be numeric, not utf8\00")
  (data (i32.const 600) "NaN\00")
  (data (i32.const 608) "inf\00")
  ;; element type names, 8 bytes each, at 640 + 8 * code
  (data (i32.const 648) "u8\00")
  (data (i32.const 656) "i8\00")
  (data (i32.const 664) "u16\00")
  (data (i32.const 672) "i16\00")
  (data (i32.const 680) "u32\00")
  (data (i32.const 688) "i32\00")
  (data (i32.const 696) "f32\00")
  (data (i32.const 704) "u64\00")
  (data (i32.const 712) "i64\00")
  (data (i32.const 720) "f64\00")
  (data (i32.const 728) "utf8\00")
  (data (i32.const 736) "?\00")

  ;; ---------------------------------------------------------------- memory and allocation

  (func $p_align8 (param $n i64) (result i64)
    (i64.and (i64.add (local.get $n) (i64.const 7)) (i64.const -8)))

  ;; Make memory cover [0, end). 1 on success, 0 when it cannot grow (or end passes 4 GiB).
  (func $p_ensure (param $end i64) (result i32)
    (local $need i64) (local $have i64)
    (if (i64.ge_u (local.get $end) (i64.const 0xFFFFFFF8)) (then (return (i32.const 0))))
    (local.set $need (i64.shr_u (i64.add (local.get $end) (i64.const 0xFFFF)) (i64.const 16)))
    (local.set $have (i64.extend_i32_u (memory.size)))
    (if (i64.gt_u (local.get $need) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.wrap_i64 (i64.sub (local.get $need) (local.get $have))))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (i32.const 1))

  ;; 1 when [ptr, ptr + len) lies inside memory.
  (func $p_in_mem (param $ptr i32) (param $len i32) (result i32)
    (i64.le_u (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $len)))
              (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16))))

  ;; The host's region: `size` bytes at the (8-aligned) host base; 0 when memory cannot grow.
  (func $p_fleet_alloc (export "fleet_alloc") (param $size i32) (result i32)
    (local $end i64)
    (local.set $end (call $p_align8 (i64.add (i64.extend_i32_u (global.get $p_host_base))
                                             (i64.extend_i32_u (local.get $size)))))
    (if (i32.eqz (call $p_ensure (local.get $end))) (then (return (i32.const 0))))
    (global.set $p_host_end (i32.wrap_i64 (local.get $end)))
    (global.set $p_top (global.get $p_host_end))
    (global.get $p_host_base))

  ;; Forget every output: called at the start of each fleet_transform.
  (func $p_reset
    (global.set $p_top (global.get $p_host_end)))

  ;; `size` bytes (8-aligned address) above the host region; 0 when memory cannot grow.
  (func $p_out (param $size i32) (result i32)
    (local $a i32) (local $end i64)
    (local.set $a (global.get $p_top))
    (local.set $end (call $p_align8 (i64.add (i64.extend_i32_u (local.get $a))
                                             (i64.extend_i32_u (local.get $size)))))
    (if (i32.eqz (call $p_ensure (local.get $end))) (then (return (i32.const 0))))
    (global.set $p_top (i32.wrap_i64 (local.get $end)))
    (local.get $a))

  ;; Like $p_out, but kept for the life of the instance: later host regions and outputs go above.
  (func $p_keep (param $size i32) (result i32)
    (local $a i32)
    (local.set $a (call $p_out (local.get $size)))
    (if (local.get $a)
      (then
        (global.set $p_host_base (global.get $p_top))
        (global.set $p_host_end (global.get $p_top))))
    (local.get $a))

  ;; ---------------------------------------------------------------- results and messages

  (func $p_result (param $status i32) (param $count i32) (param $ptr i32) (result i32)
    (i32.store (i32.const 8) (local.get $status))
    (i32.store (i32.const 12) (local.get $count))
    (i32.store (i32.const 16) (local.get $ptr))
    (i32.const 8))

  (func $p_ok (param $descs i32) (param $count i32) (result i32)
    (call $p_result (i32.const 0) (local.get $count) (local.get $descs)))

  (func $p_fail (param $msg i32) (param $len i32) (result i32)
    (call $p_result (i32.const 1) (local.get $len) (local.get $msg)))

  (func $p_strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))

  ;; Fail with a fixed NUL-terminated message.
  (func $p_fail_z (param $msg i32) (result i32)
    (call $p_fail (local.get $msg) (call $p_strlen (local.get $msg))))

  (func $p_oom (result i32)
    (call $p_fail_z (i32.const 256)))

  ;; The message builder: $p_msg_begin, then $p_msg_* pieces, then $p_msg_fail.
  (func $p_msg_begin
    (global.set $p_msg_len (i32.const 0)))

  (func $p_msg_byte (param $b i32)
    (if (i32.lt_u (global.get $p_msg_len) (i32.const 512))
      (then
        (i32.store8 (i32.add (i32.const 2560) (global.get $p_msg_len)) (local.get $b))
        (global.set $p_msg_len (i32.add (global.get $p_msg_len) (i32.const 1))))))

  (func $p_msg_z (param $p i32)
    (local $b i32)
    (block $done
      (loop $next
        (local.set $b (i32.load8_u (local.get $p)))
        (br_if $done (i32.eqz (local.get $b)))
        (call $p_msg_byte (local.get $b))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next))))

  ;; Unsigned decimal.
  (func $p_msg_u (param $v i64)
    (local $p i32)
    (local.set $p (i32.const 3103))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (loop $copy
      (call $p_msg_byte (i32.load8_u (local.get $p)))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br_if $copy (i32.lt_u (local.get $p) (i32.const 3103)))))

  ;; Signed decimal.
  (func $p_msg_i (param $v i64)
    (if (i64.lt_s (local.get $v) (i64.const 0))
      (then
        (call $p_msg_byte (i32.const 45))
        (local.set $v (i64.sub (i64.const 0) (local.get $v)))))
    (call $p_msg_u (local.get $v)))

  ;; A number for people: whole numbers as integers, others with up to 6 decimals, very large or
  ;; very small ones as d.dddddde+N; NaN, inf, -inf spelled out.
  (func $p_msg_f (param $x f64)
    (local $e i32) (local $t i64)
    (if (f64.ne (local.get $x) (local.get $x)) (then (call $p_msg_z (i32.const 600)) (return)))
    (if (i64.lt_s (i64.reinterpret_f64 (local.get $x)) (i64.const 0))
      (then
        (call $p_msg_byte (i32.const 45))
        (local.set $x (f64.neg (local.get $x)))))
    (if (f64.eq (local.get $x) (f64.const inf)) (then (call $p_msg_z (i32.const 608)) (return)))
    (if (i32.and (f64.ne (local.get $x) (f64.const 0))
                 (i32.or (f64.lt (local.get $x) (f64.const 1e-4))
                         (f64.ge (local.get $x) (f64.const 1e12))))
      (then
        (block $big_done
          (loop $big
            (br_if $big_done (f64.lt (local.get $x) (f64.const 10)))
            (local.set $x (f64.div (local.get $x) (f64.const 10)))
            (local.set $e (i32.add (local.get $e) (i32.const 1)))
            (br $big)))
        (block $small_done
          (loop $small
            (br_if $small_done (f64.ge (local.get $x) (f64.const 1)))
            (local.set $x (f64.mul (local.get $x) (f64.const 10)))
            (local.set $e (i32.sub (local.get $e) (i32.const 1)))
            (br $small)))
        (local.set $t (i64.trunc_sat_f64_u (f64.nearest (f64.mul (local.get $x) (f64.const 1e6)))))
        (if (i64.ge_u (local.get $t) (i64.const 10000000))
          (then
            (local.set $t (i64.div_u (local.get $t) (i64.const 10)))
            (local.set $e (i32.add (local.get $e) (i32.const 1)))))
        (call $p_msg_fixed6 (local.get $t))
        (call $p_msg_byte (i32.const 101))
        (if (i32.lt_s (local.get $e) (i32.const 0))
          (then (call $p_msg_byte (i32.const 45)))
          (else (call $p_msg_byte (i32.const 43))))
        (call $p_msg_i (i64.extend_i32_s
          (select (i32.sub (i32.const 0) (local.get $e)) (local.get $e)
                  (i32.lt_s (local.get $e) (i32.const 0)))))
        (return)))
    (call $p_msg_fixed6
      (i64.trunc_sat_f64_u (f64.nearest (f64.mul (local.get $x) (f64.const 1e6))))))

  ;; t / 1e6 as "int[.frac]" with trailing zeros of the fraction dropped.
  (func $p_msg_fixed6 (param $t i64)
    (local $f i64) (local $div i64)
    (call $p_msg_u (i64.div_u (local.get $t) (i64.const 1000000)))
    (local.set $f (i64.rem_u (local.get $t) (i64.const 1000000)))
    (if (i64.eqz (local.get $f)) (then (return)))
    (call $p_msg_byte (i32.const 46))
    (local.set $div (i64.const 100000))
    (block $done
      (loop $digit
        (br_if $done (i64.eqz (local.get $f)))
        (call $p_msg_byte (i32.add (i32.const 48)
          (i32.wrap_i64 (i64.div_u (local.get $f) (local.get $div)))))
        (local.set $f (i64.rem_u (local.get $f) (local.get $div)))
        (local.set $div (i64.div_u (local.get $div) (i64.const 10)))
        (br $digit))))

  ;; An element type's name.
  (func $p_msg_type (param $t i32)
    (if (i32.gt_u (i32.sub (local.get $t) (i32.const 1)) (i32.const 10))
      (then (local.set $t (i32.const 12))))
    (call $p_msg_z (i32.add (i32.const 640) (i32.shl (local.get $t) (i32.const 3)))))

  (func $p_msg_fail (result i32)
    (call $p_fail (i32.const 2560) (global.get $p_msg_len)))

  ;; Shorthand: fail with "<name><text>".
  (func $p_fail2 (param $name i32) (param $text i32) (result i32)
    (call $p_msg_begin)
    (call $p_msg_z (local.get $name))
    (call $p_msg_z (local.get $text))
    (call $p_msg_fail))

  ;; ---------------------------------------------------------------- tensors

  ;; Bytes per element of a type code; 0 for utf8 and unknown codes.
  (func $p_elem_size (param $t i32) (result i32)
    (block $b8
      (block $b4
        (block $b2
          (block $b1
            (block $b0
              (br_table $b0 $b1 $b1 $b2 $b2 $b4 $b4 $b4 $b8 $b8 $b8 $b0 (local.get $t)))
            (return (i32.const 0)))
          (return (i32.const 1)))
        (return (i32.const 2)))
      (return (i32.const 4)))
    (i32.const 8))

  (func $p_is_numeric (param $t i32) (result i32)
    (i32.le_u (i32.sub (local.get $t) (i32.const 1)) (i32.const 9)))

  (func $p_is_float (param $t i32) (result i32)
    (i32.or (i32.eq (local.get $t) (i32.const 7)) (i32.eq (local.get $t) (i32.const 10))))

  ;; Element i of a numeric tensor as f64 (u64/i64 rounded to the nearest f64).
  (func $p_load (param $t i32) (param $data i32) (param $i i32) (result f64)
    (block $f64
      (block $i64
        (block $u64
          (block $f32
            (block $i32
              (block $u32
                (block $i16
                  (block $u16
                    (block $i8
                      (block $u8
                        (block $bad
                          (br_table $bad $u8 $i8 $u16 $i16 $u32 $i32 $f32 $u64 $i64 $f64 $bad
                                    (local.get $t)))
                        (return (f64.const nan)))
                      (return (f64.convert_i32_u
                        (i32.load8_u (i32.add (local.get $data) (local.get $i))))))
                    (return (f64.convert_i32_s
                      (i32.load8_s (i32.add (local.get $data) (local.get $i))))))
                  (return (f64.convert_i32_u (i32.load16_u
                    (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 1)))))))
                (return (f64.convert_i32_s (i32.load16_s
                  (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 1)))))))
              (return (f64.convert_i32_u (i32.load
                (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))))))
            (return (f64.convert_i32_s (i32.load
              (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))))))
          (return (f64.promote_f32 (f32.load
            (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))))))
        (return (f64.convert_i64_u (i64.load
          (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3)))))))
      (return (f64.convert_i64_s (i64.load
        (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3)))))))
    (f64.load (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3)))))

  ;; Element i of an integer tensor as i64 (exact; u64 values above 2^63 come back negative, so
  ;; compare them unsigned). Float elements give 0.
  (func $p_load_i64 (param $t i32) (param $data i32) (param $i i32) (result i64)
    (block $i64
      (block $i32
        (block $u32
          (block $i16
            (block $u16
              (block $i8
                (block $u8
                  (block $bad
                    (br_table $bad $u8 $i8 $u16 $i16 $u32 $i32 $bad $i64 $i64 $bad $bad
                              (local.get $t)))
                  (return (i64.const 0)))
                (return (i64.extend_i32_u
                  (i32.load8_u (i32.add (local.get $data) (local.get $i))))))
              (return (i64.extend_i32_s
                (i32.load8_s (i32.add (local.get $data) (local.get $i))))))
            (return (i64.extend_i32_u (i32.load16_u
              (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 1)))))))
          (return (i64.extend_i32_s (i32.load16_s
            (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 1)))))))
        (return (i64.extend_i32_u (i32.load
          (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))))))
      (return (i64.extend_i32_s (i32.load
        (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))))))
    (i64.load (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3)))))

  ;; Store v as element i of a numeric tensor: floats round, integers truncate toward zero and
  ;; saturate at the type's limits (NaN becomes 0).
  (func $p_store (param $t i32) (param $data i32) (param $i i32) (param $v f64)
    (block $f64
      (block $i64
        (block $u64
          (block $f32
            (block $i32
              (block $u32
                (block $i16
                  (block $u16
                    (block $i8
                      (block $u8
                        (block $bad
                          (br_table $bad $u8 $i8 $u16 $i16 $u32 $i32 $f32 $u64 $i64 $f64 $bad
                                    (local.get $t)))
                        (return))
                      (i32.store8 (i32.add (local.get $data) (local.get $i))
                        (i32.trunc_sat_f64_u (f64.min (local.get $v) (f64.const 255))))
                      (return))
                    (i32.store8 (i32.add (local.get $data) (local.get $i))
                      (i32.trunc_sat_f64_s
                        (f64.max (f64.min (local.get $v) (f64.const 127)) (f64.const -128))))
                    (return))
                  (i32.store16 (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 1)))
                    (i32.trunc_sat_f64_u (f64.min (local.get $v) (f64.const 65535))))
                  (return))
                (i32.store16 (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 1)))
                  (i32.trunc_sat_f64_s
                    (f64.max (f64.min (local.get $v) (f64.const 32767)) (f64.const -32768))))
                (return))
              (i32.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))
                (i32.trunc_sat_f64_u (local.get $v)))
              (return))
            (i32.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))
              (i32.trunc_sat_f64_s (local.get $v)))
            (return))
          (f32.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))
            (f32.demote_f64 (local.get $v)))
          (return))
        (i64.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3)))
          (i64.trunc_sat_f64_u (local.get $v)))
        (return))
      (i64.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3)))
        (i64.trunc_sat_f64_s (local.get $v)))
      (return))
    (f64.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 3))) (local.get $v)))

  ;; 1 when element i is NaN (only float tensors have NaN).
  (func $p_is_nan (param $t i32) (param $data i32) (param $i i32) (result i32)
    (local $v f64)
    (if (i32.eqz (call $p_is_float (local.get $t))) (then (return (i32.const 0))))
    (local.set $v (call $p_load (local.get $t) (local.get $data) (local.get $i)))
    (f64.ne (local.get $v) (local.get $v)))

  ;; 1 when element i > element j, exactly for every type (0 when either is NaN).
  (func $p_gt (param $t i32) (param $data i32) (param $i i32) (param $j i32) (result i32)
    (if (i32.eq (local.get $t) (i32.const 8))
      (then (return (i64.gt_u (call $p_load_i64 (local.get $t) (local.get $data) (local.get $i))
                              (call $p_load_i64 (local.get $t) (local.get $data) (local.get $j))))))
    (if (i32.eq (local.get $t) (i32.const 9))
      (then (return (i64.gt_s (call $p_load_i64 (local.get $t) (local.get $data) (local.get $i))
                              (call $p_load_i64 (local.get $t) (local.get $data) (local.get $j))))))
    (f64.gt (call $p_load (local.get $t) (local.get $data) (local.get $i))
            (call $p_load (local.get $t) (local.get $data) (local.get $j))))

  ;; Descriptor fields.
  (func $p_type (param $d i32) (result i32) (i32.load (local.get $d)))
  (func $p_rank (param $d i32) (result i32) (i32.load offset=4 (local.get $d)))
  (func $p_dim (param $d i32) (param $k i32) (result i32)
    (i32.load offset=8 (i32.add (local.get $d) (i32.shl (local.get $k) (i32.const 2)))))
  (func $p_data (param $d i32) (result i32) (i32.load offset=40 (local.get $d)))
  (func $p_data_len (param $d i32) (result i32) (i32.load offset=44 (local.get $d)))

  ;; Number of elements: the product of the first `rank` dims (as i64, so it cannot wrap).
  (func $p_count64 (param $d i32) (result i64)
    (local $n i64) (local $k i32) (local $rank i32)
    (local.set $n (i64.const 1))
    (local.set $rank (call $p_rank (local.get $d)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $k) (local.get $rank)))
        (local.set $n (i64.mul (local.get $n)
                               (i64.extend_i32_u (call $p_dim (local.get $d) (local.get $k)))))
        (if (i64.gt_u (local.get $n) (i64.const 0xFFFFFFFF))
          (then (return (i64.const 0x100000000))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $next)))
    (local.get $n))

  (func $p_count (param $d i32) (result i32)
    (i32.wrap_i64 (call $p_count64 (local.get $d))))

  ;; A zeroed 48-byte output descriptor with its type, rank, data pointer and length; 0 on OOM.
  (func $p_new_desc (param $t i32) (param $rank i32) (param $data i32) (param $len i32)
                    (result i32)
    (local $d i32) (local $k i32)
    (local.set $d (call $p_out (i32.const 48)))
    (if (i32.eqz (local.get $d)) (then (return (i32.const 0))))
    (loop $zero
      (i64.store (i32.add (local.get $d) (local.get $k)) (i64.const 0))
      (local.set $k (i32.add (local.get $k) (i32.const 8)))
      (br_if $zero (i32.lt_u (local.get $k) (i32.const 48))))
    (i32.store (local.get $d) (local.get $t))
    (i32.store offset=4 (local.get $d) (local.get $rank))
    (i32.store offset=40 (local.get $d) (local.get $data))
    (i32.store offset=44 (local.get $d) (local.get $len))
    (local.get $d))

  (func $p_set_dim (param $d i32) (param $k i32) (param $v i32)
    (i32.store offset=8 (i32.add (local.get $d) (i32.shl (local.get $k) (i32.const 2)))
               (local.get $v)))

  ;; Copy the rank's worth of dims from descriptor src to dst (the rest stay 0).
  (func $p_copy_dims (param $dst i32) (param $src i32)
    (local $k i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $k) (call $p_rank (local.get $src))))
        (call $p_set_dim (local.get $dst) (local.get $k)
                         (call $p_dim (local.get $src) (local.get $k)))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $next))))

  ;; Start of every fleet_transform: forget old outputs, then check that there is exactly one
  ;; input and that its descriptor is consistent. 0 when fine, else a failure result pointer.
  ;; `name` is the block's NUL-terminated name, used as the message prefix.
  (func $p_expect_one (param $inputs i32) (param $count i32) (param $name i32) (result i32)
    (local $t i32) (local $rank i32) (local $need i64)
    (call $p_reset)
    (if (i32.ne (local.get $count) (i32.const 1))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (local.get $name))
        (call $p_msg_z (i32.const 288))
        (call $p_msg_u (i64.extend_i32_u (local.get $count)))
        (return (call $p_msg_fail))))
    (if (i32.eqz (call $p_in_mem (local.get $inputs) (i32.const 48)))
      (then (return (call $p_fail2 (local.get $name) (i32.const 512)))))
    (local.set $t (call $p_type (local.get $inputs)))
    (local.set $rank (call $p_rank (local.get $inputs)))
    (if (i32.gt_u (i32.sub (local.get $rank) (i32.const 1)) (i32.const 7))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (local.get $name))
        (call $p_msg_z (i32.const 336))
        (call $p_msg_u (i64.extend_i32_u (local.get $rank)))
        (call $p_msg_z (i32.const 360))
        (return (call $p_msg_fail))))
    (if (i32.gt_u (i32.sub (local.get $t) (i32.const 1)) (i32.const 10))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (local.get $name))
        (call $p_msg_z (i32.const 392))
        (call $p_msg_u (i64.extend_i32_u (local.get $t)))
        (return (call $p_msg_fail))))
    (if (call $p_is_numeric (local.get $t))
      (then
        (local.set $need (i64.mul (call $p_count64 (local.get $inputs))
                                  (i64.extend_i32_u (call $p_elem_size (local.get $t)))))
        (if (i64.ne (local.get $need) (i64.extend_i32_u (call $p_data_len (local.get $inputs))))
          (then
            (call $p_msg_begin)
            (call $p_msg_z (local.get $name))
            (call $p_msg_z (i32.const 440))
            (call $p_msg_u (i64.extend_i32_u (call $p_data_len (local.get $inputs))))
            (call $p_msg_z (i32.const 464))
            (call $p_msg_u (local.get $need))
            (return (call $p_msg_fail))))))
    (if (i32.eqz (call $p_in_mem (call $p_data (local.get $inputs))
                                 (call $p_data_len (local.get $inputs))))
      (then (return (call $p_fail2 (local.get $name) (i32.const 512)))))
    (i32.const 0))

  ;; 0 when the input is numeric, else a failure result "<name>: the input must be numeric...".
  (func $p_expect_numeric (param $d i32) (param $name i32) (result i32)
    (if (call $p_is_numeric (call $p_type (local.get $d))) (then (return (i32.const 0))))
    (call $p_fail2 (local.get $name) (i32.const 560)))

  ;; ---------------------------------------------------------------- args

  ;; The arg record whose key equals the NUL-terminated `key`, or 0.
  (func $p_find_arg (param $args i32) (param $count i32) (param $key i32) (result i32)
    (local $i i32) (local $rec i32) (local $kp i32) (local $kl i32) (local $j i32)
    (local $len i32)
    (local.set $len (call $p_strlen (local.get $key)))
    (block $none
      (loop $next
        (br_if $none (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $rec (i32.add (local.get $args) (i32.shl (local.get $i) (i32.const 5))))
        (br_if $none (i32.eqz (call $p_in_mem (local.get $rec) (i32.const 32))))
        (local.set $kp (i32.load (local.get $rec)))
        (local.set $kl (i32.load offset=4 (local.get $rec)))
        (if (i32.and (i32.eq (local.get $kl) (local.get $len))
                     (call $p_in_mem (local.get $kp) (local.get $kl)))
          (then
            (local.set $j (i32.const 0))
            (block $differ
              (loop $byte
                (if (i32.ge_u (local.get $j) (local.get $len))
                  (then (return (local.get $rec))))
                (br_if $differ (i32.ne (i32.load8_u (i32.add (local.get $kp) (local.get $j)))
                                       (i32.load8_u (i32.add (local.get $key) (local.get $j)))))
                (local.set $j (i32.add (local.get $j) (i32.const 1)))
                (br $byte)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  (func $p_arg_value (param $rec i32) (result i32) (i32.load offset=8 (local.get $rec)))
  (func $p_arg_value_len (param $rec i32) (result i32) (i32.load offset=12 (local.get $rec)))
  (func $p_arg_is_number (param $rec i32) (result i32)
    (i32.eq (i32.load offset=16 (local.get $rec)) (i32.const 1)))
  (func $p_arg_number (param $rec i32) (result f64) (f64.load offset=24 (local.get $rec)))

  ;; ---------------------------------------------------------------- math

  ;; 2^k for -1022 <= k <= 1023, straight from the exponent bits.
  (func $p_pow2 (param $k i32) (result f64)
    (f64.reinterpret_i64
      (i64.shl (i64.extend_i32_s (i32.add (local.get $k) (i32.const 1023))) (i64.const 52))))

  ;; x * 2^k for any k (steps of 2^1000 keep every factor a normal number).
  (func $p_ldexp (param $x f64) (param $k i32) (result f64)
    (block $up_done
      (loop $up
        (br_if $up_done (i32.le_s (local.get $k) (i32.const 1000)))
        (local.set $x (f64.mul (local.get $x) (call $p_pow2 (i32.const 1000))))
        (local.set $k (i32.sub (local.get $k) (i32.const 1000)))
        (br $up)))
    (block $down_done
      (loop $down
        (br_if $down_done (i32.ge_s (local.get $k) (i32.const -1000)))
        (local.set $x (f64.mul (local.get $x) (call $p_pow2 (i32.const -1000))))
        (local.set $k (i32.add (local.get $k) (i32.const 1000)))
        (br $down)))
    (f64.mul (local.get $x) (call $p_pow2 (local.get $k))))

  ;; e^x: x = k*ln2 + r with |r| <= ln2/2 (ln2 split in two parts so k*ln2_hi is exact), e^r by
  ;; its Taylor series to r^13 (error below 1e-17 on that range), then scaled by 2^k.
  (func $p_exp (param $x f64) (result f64)
    (local $k f64) (local $r f64) (local $p f64)
    (if (f64.ne (local.get $x) (local.get $x)) (then (return (local.get $x))))
    (if (f64.gt (local.get $x) (f64.const 709.782712893384)) (then (return (f64.const inf))))
    (if (f64.lt (local.get $x) (f64.const -745.1332191019412)) (then (return (f64.const 0))))
    (local.set $k (f64.nearest (f64.mul (local.get $x) (f64.const 1.4426950408889634))))
    (local.set $r
      (f64.sub (f64.sub (local.get $x) (f64.mul (local.get $k) (f64.const 6.93147180369123816490e-01)))
               (f64.mul (local.get $k) (f64.const 1.90821492927058770002e-10))))
    (local.set $p (f64.const 1.6059043836821613e-10))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 2.08767569878681e-09)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 2.505210838544172e-08)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 2.755731922398589e-07)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 2.7557319223985893e-06)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 2.48015873015873e-05)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 0.0001984126984126984)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 0.001388888888888889)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 0.008333333333333333)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 0.041666666666666664)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 0.16666666666666666)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 0.5)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 1)))
    (local.set $p (f64.add (f64.mul (local.get $p) (local.get $r)) (f64.const 1)))
    (call $p_ldexp (local.get $p) (i32.trunc_f64_s (local.get $k))))
