// Starting points for a new module, each a manifest that passes `kiln validate` as written
// (the browser tests check every one). `make(opts)` returns the YAML text.

// A Debian VM bootstrapped from packages, with a root disk and one shell step; `more` adds
// lines after the disks (its NICs).
const debianVm = ({ name, memory, step, command, more = '' }) => `  - name: ${name}
    source:
      bootstrap:
        distro: debian
        suite: bookworm
        packages: []
    resources:
      cpu: 1
      memory: ${memory}
    disks:
      - name: root
        size: 4Gi
${more}    provisioners:
      - name: ${step}
        type: shell
        shell:
          inline: |
            ${command}
`;

const single = () => `# One Debian VM bootstrapped from packages, with one shell step.
vms:
${debianVm({ name: 'vm1', memory: '1Gi', step: 'hello', command: 'echo "built by kiln" > /etc/motd' })}`;

const onLab = `    nics:
      - name: eth0
        subnet: lab
`;

const pair = () => `# Two VMs on one private network: they reach each other by name.
network:
  vpcs:
    - name: lab
      internet: false
  subnets:
    - name: lab
      vpc: lab
      cidr: 10.20.0.0/24
vms:
${debianVm({ name: 'web', memory: '512Mi', step: 'hello', command: 'echo "web is up"', more: onLab })}${debianVm({ name: 'client', memory: '512Mi', step: 'reach-web', command: 'getent hosts web', more: onLab })}`;

// A layer over a module that exists: its disk is the starting point, the steps add to it.
const layered = ({ module = 'hello', vm = '' } = {}) => `# A layer over the module \`${module}\`: its disk, with more steps on top.
vms:
  - name: ${vm || module}
    source:
      buildRef:
        name: ${module}${vm ? `\n        vmName: ${vm}` : ''}
    resources:
      cpu: 1
      memory: 1Gi
    disks:
      - name: root
        size: 4Gi
    provisioners:
      - name: second-layer
        type: shell
        shell:
          inline: |
            set -eu
            echo "layered on ${module}" > /etc/kiln-layered
`;

// Like examples/debian-netinst.yaml: a blank disk, the installer ISO, a boot command and a
// preseed answer file; the steps run over SSH once the installed system is up.
const iso = () => `# Debian installed by its own installer from the netinst ISO, answered by a preseed
# file kiln serves on the module network; steps then run over SSH.
vms:
  - name: debian
    source:
      blank: true
    resources:
      cpu: 2
      memory: 2Gi
    disks:
      - name: root
        size: 8Gi
    communicator:
      type: ssh
      sshUsername: root
      sshPassword: change-me
      sshTimeout: 60m
    bootCommand:
      - <esc><wait>
      - auto preseed/url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/preseed.cfg netcfg/hostname=debian<enter>
    bootWait: 20s
    provisioners:
      - name: facts
        type: shell
        shell:
          inline: |
            set -eu
            . /etc/os-release
            echo "$PRETTY_NAME, kernel $(uname -r)"
    isos:
      - url: https://cdimage.debian.org/cdimage/archive/12.15.0/amd64/iso-cd/debian-12.15.0-amd64-netinst.iso
        checksum: sha256:cd4462c06aa8892e692c0c4b9c17802f38c8ab8690e85cbfb5ccaa5956e9af17
files:
  - name: preseed.cfg
    inline: |
      d-i debian-installer/locale string en_US.UTF-8
      d-i keyboard-configuration/xkb-keymap select us
      d-i netcfg/choose_interface select auto
      d-i netcfg/get_hostname string debian
      d-i netcfg/get_domain string
      d-i mirror/country string manual
      d-i mirror/http/hostname string deb.debian.org
      d-i mirror/http/directory string /debian
      d-i mirror/http/proxy string
      d-i passwd/root-login boolean true
      d-i passwd/make-user boolean false
      d-i passwd/root-password password change-me
      d-i passwd/root-password-again password change-me
      d-i clock-setup/utc boolean true
      d-i time/zone string Etc/UTC
      d-i partman-auto/disk string /dev/vda
      d-i partman-auto/method string regular
      d-i partman-auto/choose_recipe select atomic
      d-i partman-partitioning/confirm_write_new_label boolean true
      d-i partman/choose_partition select finish
      d-i partman/confirm boolean true
      d-i partman/confirm_nooverwrite boolean true
      d-i base-installer/kernel/image string linux-image-amd64
      tasksel tasksel/first multiselect ssh-server
      d-i grub-installer/only_debian boolean true
      d-i grub-installer/bootdev string /dev/vda
      d-i preseed/late_command string mkdir -p /target/etc/ssh/sshd_config.d; echo 'PermitRootLogin yes' > /target/etc/ssh/sshd_config.d/50-kiln-build.conf
      d-i finish-install/reboot_in_progress note
httpDirectory:
  files:
    - name: preseed.cfg
timeout: 2h
`;

export const RECIPES = [
  { id: 'single', title: 'Single VM', about: 'one Debian VM bootstrapped from packages', make: single },
  { id: 'pair', title: 'Two VMs on a network', about: 'two VMs on a private subnet, reaching each other by name', make: pair },
  { id: 'layered', title: 'Layered build', about: 'more steps on top of a module you built', make: layered, needsModule: true },
  { id: 'iso', title: 'ISO install', about: "an OS installed by its own installer (Debian's netinst, preseeded)", make: iso },
];
